"""A VLM judge over an OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp server, OpenAI, …).

``{"source": "judge", "options": {"endpoint": "http://127.0.0.1:8000/v1", "model": "Qwen2.5-VL-7B-Instruct"}}``;
the endpoint may instead come from ``UNIREF_JUDGE_URL`` and the key from ``api_key`` or the environment
variable named by ``api_key_env`` (default ``OPENAI_API_KEY``). This is the only network use at run time,
and only to the endpoint the user configured. A key is sent only over https, or plain http to this machine
(localhost, 127.0.0.1, ::1).

Per image, one question per reference ("how well does the result keep Picture k?"), one on the
instruction and one on quality, each answered with a number from 0 to 10 (images inline as PNG data URLs).
Answers parse robustly ("7", "Score: 7/10", "**8**"). A call that times out or fails is retried; if it
still fails, or its answer has no score, the image is marked failed (dropped from its group, counted),
never scored 0.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import RewardBatch, RewardError, Signal

SCALE = 10
#: Hosts a key may go to over plain http: the traffic never leaves this machine.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
QUESTIONS = {
    "reference": (
        "The first image is Picture {k}, a reference. The second image is the result of the edit "
        'instruction: "{instruction}". How faithfully does the result keep what it should take from '
        "Picture {k} (its object's shape, colour and identity, or its background)? Answer with one number "
        f"from 0 to {SCALE}."
    ),
    "instruction": (
        'The last image is the result of the edit instruction: "{instruction}"; the images before it '
        f"are Pictures 1…K it refers to. How well does the result follow the instruction? Answer with "
        f"one number from 0 to {SCALE}."
    ),
    "quality": (
        f"How good is the visual quality of this image (sharp, clean, free of artefacts)? Answer with one "
        f"number from 0 to {SCALE}."
    ),
}
_NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s*(?:/\s*(\d+(?:\.\d+)?))?")


class JudgeCallFailed(Exception):
    pass


def parse_score(text: str) -> float | None:
    """The first number of an answer as a score in [0, 1] ("7" → 0.7, "3/5" → 0.6); None when there is none."""
    m = _NUMBER.search(text or "")
    if m is None:
        return None
    value, denom = float(m[1]), float(m[2]) if m[2] else float(SCALE)
    if denom <= 0 or value > denom:
        return None
    return value / denom


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _check_endpoint_url(endpoint: str, key_from: str | None) -> None:
    """An http(s) endpoint; one that gets a key (from ``key_from``) is https, or plain http to this machine."""
    url = urllib.parse.urlsplit(endpoint)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise RewardError(
            f"reward source 'judge': endpoint {endpoint} is not an http(s) URL: give one such as "
            "https://judge.example/v1 or http://127.0.0.1:8000/v1"
        )
    if key_from and url.scheme == "http" and url.hostname not in LOCAL_HOSTS:
        raise RewardError(
            f"reward source 'judge': endpoint {endpoint} is plain http, which would send the API key "
            f"({key_from}) unencrypted to {url.hostname}; use https, or a judge on this machine "
            f"({', '.join(LOCAL_HOSTS)}), or unset the key for a server that needs none"
        )


def judge_source(
    endpoint: str | None = None,
    model: str = "default",
    api_key: str | None = None,
    api_key_env: str = "OPENAI_API_KEY",
    timeout: float = 60.0,
    retries: int = 2,
    backoff: float = 1.0,
    concurrency: int = 8,
    max_tokens: int = 16,
    check_endpoint: bool = True,
):
    """Factory: checks at start-up that the endpoint answers (an unreachable judge is an error before training)."""
    endpoint = (endpoint or os.environ.get("UNIREF_JUDGE_URL") or "").rstrip("/")
    if not endpoint:
        raise RewardError(
            "reward source 'judge': no endpoint: set options.endpoint (e.g. http://127.0.0.1:8000/v1) "
            "or UNIREF_JUDGE_URL"
        )
    key = api_key or os.environ.get(api_key_env)
    _check_endpoint_url(endpoint, "options.api_key" if api_key else f"${api_key_env}" if key else None)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    if check_endpoint:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint + "/models", headers=headers), timeout=timeout)  # nosec B310  # _check_endpoint_url admits http(s) URLs only
        except urllib.error.HTTPError:
            pass  # it answered (some servers have no /models): reachable
        except (urllib.error.URLError, OSError) as e:
            raise RewardError(
                f"reward source 'judge': endpoint {endpoint} is unreachable ({e}); start the server or "
                "fix options.endpoint / UNIREF_JUDGE_URL"
            ) from None

    def ask(question: str, images) -> float:
        content = [{"type": "image_url", "image_url": {"url": _data_url(im)}} for im in images]
        content.append({"type": "text", "text": question})
        body = json.dumps(
            {
                "model": model,
                "messages": [{"role": "user", "content": content}],
                "max_tokens": max_tokens,
                "temperature": 0,
            }
        ).encode()
        last = "no attempt"
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(backoff * 2 ** (attempt - 1))
            try:
                req = urllib.request.Request(endpoint + "/chat/completions", data=body, headers=headers)
                with urllib.request.urlopen(req, timeout=timeout) as resp:  # nosec B310  # _check_endpoint_url admits http(s) URLs only
                    answer = json.loads(resp.read())["choices"][0]["message"]["content"]
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
                if e.code < 500 and e.code != 429:
                    break  # a request the server refuses will not succeed on retry
                continue
            except (urllib.error.URLError, OSError, TimeoutError) as e:
                last = f"{type(e).__name__}: {e}"
                continue
            except (ValueError, KeyError, IndexError, TypeError):
                last = "malformed response (no choices[0].message.content)"
                continue
            score = parse_score(answer if isinstance(answer, str) else str(answer))
            if score is None:
                raise JudgeCallFailed(f"answer without a score: {str(answer)[:60]!r}")
            return score
        raise JudgeCallFailed(f"{last} after {retries + 1} attempt(s)")

    def source(images, row) -> RewardBatch:
        from uniref_core.images import load_image

        refs = [load_image(p) for p in row.references]
        instruction = row.instruction
        jobs = []  # (image index, signal, question, images)
        for i, im in enumerate(images):
            for k, ref in enumerate(refs, start=1):
                jobs.append((i, f"ref{k}", QUESTIONS["reference"].format(k=k, instruction=instruction), [ref, im]))
            jobs.append((i, "instruction", QUESTIONS["instruction"].format(instruction=instruction), refs + [im]))
            jobs.append((i, "quality", QUESTIONS["quality"], [im]))

        def run(job):
            try:
                return ask(job[2], job[3]), None
            except JudgeCallFailed as e:
                return float("nan"), f"judge {job[1]} of image {job[0]}: {e}"

        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            answers = list(pool.map(run, jobs))
        g = len(images)
        values = {
            name: np.full(g, np.nan)
            for name in [f"ref{k}" for k in range(1, len(refs) + 1)] + ["instruction", "quality"]
        }
        notes = []
        for (i, name, _, _), (score, note) in zip(jobs, answers):
            values[name][i] = score
            if note:
                notes.append(note)
        failed = np.zeros(g, bool)
        for v in values.values():
            failed |= ~np.isfinite(v)
        signals = {
            name: Signal(
                v, "reference" if name.startswith("ref") else name, int(name[3:]) if name.startswith("ref") else None
            )
            for name, v in values.items()
        }
        return RewardBatch(signals, failed, notes)

    return source
