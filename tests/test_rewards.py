"""Reward sources against real parts: a tiny random DINOv2 folder, and a judge HTTP server on 127.0.0.1."""

import base64
import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from training.rewards import RewardError, check_batch, load_source
from training.rewards.judge import parse_score
from training.rl.advantages import group_advantages


def _image(colour, size=32):
    im = Image.new("RGB", (size, size), colour)
    im.paste(Image.new("RGB", (size // 2, size // 2), "gray"), (size // 4, size // 4))
    return im


@pytest.fixture()
def row(tmp_path):
    paths = []
    for k, colour in enumerate(["red", "blue"], start=1):
        p = tmp_path / f"ref{k}.png"
        _image(colour).save(p)
        paths.append(p)
    return SimpleNamespace(references=paths, instruction="Put Picture 1 left of Picture 2.", where="row 1")


def test_feature_similarity_is_highest_for_the_reference_the_image_copies(tmp_path, row):
    from transformers import Dinov2Config, Dinov2Model

    folder = tmp_path / "dinov2-tiny"
    cfg = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    Dinov2Model(cfg).save_pretrained(folder, safe_serialization=True)
    src = load_source("features", {"path": str(folder)})
    images = [_image("red"), _image("blue")]
    out = check_batch(src(images, row), "features", 2)
    ref1, ref2 = out.signals["features/ref1"].values, out.signals["features/ref2"].values
    assert ref1[0] == pytest.approx(1.0, abs=1e-5) and ref2[1] == pytest.approx(1.0, abs=1e-5)
    assert ref1[0] > ref1[1] and ref2[1] > ref2[0]
    with pytest.raises(RewardError, match="not a transformers model folder"):
        load_source("features", {"path": str(tmp_path / "nowhere")})


@pytest.mark.parametrize(
    "text, score",
    [
        ("7", 0.7),
        ("Score: 8/10", 0.8),
        ("**9**", 0.9),
        ("3 / 5", 0.6),
        ("I think 10.", 1.0),
        ("no idea", None),
        ("12", None),
    ],
)
def test_judge_answers_parse_robustly(text, score):
    assert parse_score(text) == (pytest.approx(score) if score is not None else None)


class _Judge(BaseHTTPRequestHandler):
    """Answers by the colour of the result image (the last image of a question):
    white: good scores; black: an answer with no score; red: HTTP 500 every time; green: 500 once, then
    good (a retry rescues it); blue: too slow for the client's timeout."""

    calls: dict = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(404)
        self.end_headers()

    def _reply(self, code, text=None):
        body = json.dumps({"choices": [{"message": {"content": text}}]}).encode() if text is not None else b"{}"
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on a slow answer (its timeout): what the blue case tests

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        content = req["messages"][0]["content"]
        url = [c for c in content if c["type"] == "image_url"][-1]["image_url"]["url"]
        question = [c for c in content if c["type"] == "text"][0]["text"]
        im = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
        colour = {
            (255, 255, 255): "white",
            (0, 0, 0): "black",
            (255, 0, 0): "red",
            (0, 128, 0): "green",
            (0, 0, 255): "blue",
        }[im.getpixel((0, 0))]
        key = (colour, question)
        _Judge.calls[key] = _Judge.calls.get(key, 0) + 1
        if colour == "red" or (colour == "green" and _Judge.calls[key] == 1):
            return self._reply(500)
        if colour == "blue":
            time.sleep(4.0)  # far beyond the client timeout, even on a loaded machine
        if colour == "black":
            return self._reply(200, "I cannot judge this image.")
        answer = (
            "Score: 8/10"
            if "Picture" in question and "reference" in question
            else ("7" if "instruction" in question else "**9**")
        )
        self._reply(200, answer)


@pytest.fixture()
def judge_server():
    _Judge.calls = {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_judge_scores_each_reference_and_drops_images_it_could_not_score(judge_server, row):
    src = load_source("judge", {"endpoint": judge_server, "timeout": 1.5, "retries": 1, "backoff": 0.01})
    images = [Image.new("RGB", (32, 32), c) for c in ("white", "black", "red", "green", "blue")]
    out = check_batch(src(images, row), "judge", 5)
    assert out.failed.tolist() == [False, True, True, False, True]
    for i in (0, 3):
        assert [
            out.signals[f"judge/{s}"].values[i] for s in ("ref1", "ref2", "instruction", "quality")
        ] == pytest.approx([0.8, 0.8, 0.7, 0.9])
    notes = " | ".join(out.notes)
    assert "without a score" in notes and "HTTP 500 after 2 attempt(s)" in notes and "timed out" in notes
    # The failed images are out of the group's statistics: no silent 0 reward.
    adv, reward = group_advantages(out, {}, "normalized_sum")
    assert np.isnan(adv[[1, 2, 4]]).all() and np.isfinite(adv[[0, 3]]).all()


def test_an_unreachable_judge_is_an_error_at_start_up():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RewardError, match=f"endpoint http://127.0.0.1:{port}/v1 is unreachable"):
        load_source("judge", {"endpoint": f"http://127.0.0.1:{port}/v1", "timeout": 2})
    with pytest.raises(RewardError, match="no endpoint"):
        load_source("judge", {"endpoint": ""})


@pytest.mark.parametrize("endpoint", ["http://judge.example.com/v1", "http://10.0.0.7:8000/v1"])
def test_the_judge_never_sends_a_key_over_plain_http_off_this_machine(endpoint, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    monkeypatch.setattr("urllib.request.urlopen", lambda *a, **kw: pytest.fail("a request was sent"))
    host = endpoint.split("//")[1].split(":")[0].split("/")[0]
    with pytest.raises(RewardError) as err:
        load_source("judge", {"endpoint": endpoint})
    assert (
        f"endpoint {endpoint} is plain http, which would send the API key ($OPENAI_API_KEY) unencrypted to "
        f"{host}; use https, or a judge on this machine (localhost, 127.0.0.1, ::1)" in str(err.value)
    )
    with pytest.raises(RewardError, match=r"\(options.api_key\) unencrypted"):
        load_source("judge", {"endpoint": endpoint, "api_key": "sk-other"})
    with pytest.raises(RewardError, match="is not an http\\(s\\) URL"):
        load_source("judge", {"endpoint": "file:///etc/passwd"})


def test_the_judge_sends_a_key_over_https_and_to_this_machine(judge_server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    load_source("judge", {"endpoint": judge_server})  # http to 127.0.0.1: reachable, accepted
    load_source("judge", {"endpoint": "https://judge.example.com/v1", "check_endpoint": False})
    monkeypatch.delenv("OPENAI_API_KEY")
    load_source("judge", {"endpoint": "http://judge.example.com/v1", "check_endpoint": False})  # no key to leak
