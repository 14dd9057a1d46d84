"""A tiny, randomly initialised Qwen-Image-Edit-2509/2511 model, built offline.

Tests, benchmarks and examples use :func:`make_tiny_model` to get a model folder with the
exact layout of the published ``Qwen/Qwen-Image-Edit-2509`` / ``-2511`` diffusers repos
(``model_index.json`` naming ``QwenImageEditPlusPipeline``, and ``transformer/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``processor/``, ``scheduler/``, weights as safetensors
only), but a few megabytes big and fast on a CPU. Everything is built from configs here:
no network, no hub, no ``trust_remote_code``. The weights are random, so the images it
makes are noise; what it checks is the plumbing.

It keeps the parts of the real model that code depends on:

* the same classes, the 8x VAE, 2x2 latent packing, 64 packed latent channels and the
  ``zero_cond_t`` switch of 2511;
* the real scheduler config and the real Qwen2-VL image-processor settings;
* a byte-level BPE tokenizer with Qwen2's pre-tokenizer, trained here so that the
  pipeline's prompt-template prefix (through ``<|im_start|>user\\n``) is exactly
  :data:`TEMPLATE_PREFIX_TOKENS` = 64 tokens, as with the real Qwen tokenizer; the pipeline
  drops that many hidden states (``prompt_template_encode_start_idx``);
* the same special tokens, with the text-encoder config pointing at their ids here.

``family="qwen21"`` builds a tiny Qwen-Image 2.1 folder instead (:func:`make_tiny_qwen21`, the ``QWEN21_*``
configs): what diffusers' ``QwenImage21Pipeline`` loads, with its 16x RGBA VAE, Qwen3-VL encoder and chat template.
"""

from __future__ import annotations

import json
import pathlib

import torch

from .atomic import atomic_dir
from .errors import UniRefError
from .qwen21 import SYSTEM_PROMPT

__all__ = [
    "make_tiny_model",
    "make_tiny_qwen21",
    "FAMILIES",
    "VAE_4X",
    "check_tokenizer",
    "TEMPLATE_PREFIX_TOKENS",
    "SPECIAL_TOKENS",
]

#: What :func:`make_tiny_model` builds: "edit" (Qwen-Image-Edit-2509/2511) or "qwen21" (Qwen-Image 2.1).
FAMILIES = ("edit", "qwen21")

# --- transformer / VAE / scheduler configs ------------------------------------------------

TRANSFORMER_CONFIG = dict(
    patch_size=2,
    in_channels=64,  # 16 latent channels x 2x2 packing, as in the real model
    out_channels=16,
    num_layers=2,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=64,  # == text encoder hidden size
    axes_dims_rope=(8, 12, 12),  # sums to attention_head_dim, each even
)

VAE_CONFIG = dict(
    base_dim=16,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True, True],  # 3 stages -> 8x down-sampling like the real one
    latents_mean=[0.0] * 16,
    latents_std=[1.0] * 16,
)

#: A 4x VAE of the same class (two down-sampling stages): one transformer token is then 8×8 px.
#: Real checkpoints are 8x; the built-in default model uses this to see small objects in more tokens.
VAE_4X = dict(dim_mult=[1, 2, 4], temperal_downsample=[False, True])

# The real Qwen-Image scheduler/scheduler_config.json.
SCHEDULER_CONFIG = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    invert_sigmas=False,
    max_image_seq_len=8192,
    max_shift=0.9,
    num_train_timesteps=1000,
    shift=1.0,
    shift_terminal=0.02,
    stochastic_sampling=False,
    time_shift_type="exponential",
    use_beta_sigmas=False,
    use_dynamic_shifting=True,
    use_exponential_sigmas=False,
    use_karras_sigmas=False,
)

# --- text encoder (Qwen2.5-VL) configs ----------------------------------------------------

TEXT_CONFIG = dict(
    hidden_size=64,  # == TRANSFORMER_CONFIG["joint_attention_dim"]
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,  # head_dim 16
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    max_window_layers=2,
    # mrope sections (temporal, height, width) sum to head_dim / 2, like [16, 24, 24] for 128.
    rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0},
)

VISION_CONFIG = dict(
    depth=2,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    out_hidden_size=64,  # == TEXT_CONFIG["hidden_size"]
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[1],
    tokens_per_second=2,
)

# The real Qwen2.5-VL / Qwen-Image-Edit processor/preprocessor_config.json settings.
IMAGE_PROCESSOR_CONFIG = dict(
    min_pixels=3136,
    max_pixels=12845056,
    patch_size=14,
    temporal_patch_size=2,
    merge_size=2,
    image_mean=[0.48145466, 0.4578275, 0.40821073],
    image_std=[0.26862954, 0.26130258, 0.27577711],
)

VIDEO_PROCESSOR_CONFIG = dict(patch_size=14, temporal_patch_size=2, merge_size=2)

#: Overrides (``make_tiny_model(path, **REAL_PROPORTIONS)``) for a model in the real one's proportions at ~1/100 of
#: its size, for memory measurements: the transformer's real head width (8 heads × 128 instead of 24 × 128, 5
#: blocks instead of 60, text width 1024 instead of 3584; ~190 M parameters) and a Qwen2.5-VL text stack shaped like
#: the 7B one (head 128, 4:1 grouped KV, MLP 6× the width) at 0.45 of the transformer's size, as 8.3 B is of
#: 20.4 B. Memory per weight and per activation then scales like the real model's.
REAL_PROPORTIONS = dict(
    transformer=dict(
        num_layers=5,
        attention_head_dim=128,
        num_attention_heads=8,
        joint_attention_dim=1024,
        axes_dims_rope=(16, 56, 56),
    ),
    text=dict(
        hidden_size=1024,
        intermediate_size=6144,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_window_layers=4,
        rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
    ),
    dtype="bf16",
)

# --- Qwen-Image 2.1 (family "qwen21") -------------------------------------------------------

QWEN21_TRANSFORMER_CONFIG = dict(
    patch_size=1,  # latents are not packed: one token is one 16x16 px latent
    in_channels=64,  # == QWEN21_VAE_CONFIG["z_dim"]
    out_channels=64,
    num_layers=2,
    attention_head_dim=32,
    num_attention_heads=2,
    context_in_dim=64,  # == QWEN21_TEXT_CONFIG["hidden_size"]
    mlp_ratio=3,
    axes_dims_rope=(8, 12, 12),  # sums to attention_head_dim, each even
    causal_condition=True,  # text and references modulated at t = 0, so their keys and values can be cached
)

QWEN21_VAE_CONFIG = dict(
    base_dim=16,
    decoder_base_dim=16,
    z_dim=64,
    dim_mult=[1, 2, 4, 4, 4],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True, True, True],  # 4 stages -> 16x, the pipeline's fixed vae_scale_factor
    latents_mean=[0.0] * 64,
    latents_std=[1.0] * 64,
    in_channels=4,  # RGBA in and out
    out_channels=4,
)

QWEN21_TEXT_CONFIG = dict(
    hidden_size=64,  # == QWEN21_TRANSFORMER_CONFIG["context_in_dim"]
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    # mrope sections (temporal, height, width) sum to head_dim / 2
    rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True, "rope_theta": 5e6},
)

QWEN21_VISION_CONFIG = dict(
    depth=2,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    patch_size=16,  # x spatial_merge_size = 32 px per VL slot = 2x2 latents of the 16x VAE
    spatial_merge_size=2,
    temporal_patch_size=2,
    out_hidden_size=64,  # == QWEN21_TEXT_CONFIG["hidden_size"]
    num_position_embeddings=256,
    deepstack_visual_indexes=[1],
)

# min_pixels 32x32: the processor up-scales anything smaller, and the pipeline sends the VL encoder and the VAE the
# same size, so a larger floor would make the two disagree for small references.
QWEN21_IMAGE_PROCESSOR_CONFIG = dict(
    patch_size=16,
    temporal_patch_size=2,
    merge_size=2,
    min_pixels=32 * 32,
    max_pixels=16777216,
    image_mean=[0.5] * 3,
    image_std=[0.5] * 3,
)

QWEN21_VIDEO_PROCESSOR_CONFIG = dict(patch_size=16, temporal_patch_size=2, merge_size=2)

# QwenImage21Pipeline counts the system turn's tokens through the processor's chat template, so it needs one.
QWEN21_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
    "{% elif c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# --- tokenizer ----------------------------------------------------------------------------

# In the order of the real Qwen2 vocabulary (which puts them after the BPE tokens).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# diffusers' QwenImageEditPlusPipeline.prompt_template_encode_start_idx
TEMPLATE_PREFIX_TOKENS = 64

# Words that editing instructions use, so that each is a single token (with and without a
# leading space, lower case and capitalised).
_WORDS = """
red green blue yellow orange purple pink cyan magenta white black gray grey brown
circle square triangle star ring cross heart diamond hexagon shape shapes
left right top bottom centre center middle corner upper lower side edge
put place move recolour recolor resize remove change make add swap compose keep turn
object objects background picture image images from the of on in at with and a an to
into onto next beside above below behind over under same size color colour small large
big tiny bigger smaller half scene Picture first second third new its it is this that
""".split()


def _template_prefix() -> str:
    """The pipeline's prompt template up to and including ``<|im_start|>user\\n``."""
    from diffusers import QwenImageEditPlusPipeline

    # An empty pipeline (no components) is enough to read the template diffusers uses.
    empty = QwenImageEditPlusPipeline(
        scheduler=None, vae=None, text_encoder=None, tokenizer=None, processor=None, transformer=None
    )
    return empty.prompt_template_encode.split("{}")[0]


def _corpus() -> list[str]:
    prefix = _template_prefix()
    system = prefix.replace("<|im_start|>", "").replace("<|im_end|>", "")
    lines = [system] * 4
    for w in _WORDS:
        for form in (w, w.capitalize()):
            lines += [form, " " + form] * 2
    lines += [f"Picture {i}: " for i in range(1, 10)]
    lines += [
        "Put the red circle from Picture 1 on the left of the blue square in Picture 2.",
        "Move the object to the top right corner and keep the background.",
        "Recolour the star green and resize it to half the size.",
    ]
    return lines


def _build_tokenizer(extra_lines: tuple[str, ...] = ()):
    """The tiny BPE tokenizer trained on :func:`_corpus` (plus ``extra_lines``), with the special tokens.

    The Edit tokenizer (no extra lines) is checked to split the Edit template prefix into
    :data:`TEMPLATE_PREFIX_TOKENS` tokens; any tokenizer, to keep each special token whole."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    # Same normaliser and pre-tokeniser as transformers' Qwen2Tokenizer, so the trained
    # merges apply to the same pieces.
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8192,  # a ceiling: training stops once every corpus word is one token
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus() + list(extra_lines), trainer=trainer)

    state = json.loads(bpe.to_str())["model"]
    vocab = dict(state["vocab"])
    for tok in SPECIAL_TOKENS:  # after the BPE tokens, as in the real vocabulary
        vocab[tok] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        extra_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=32768,
    )
    if extra_lines:
        _check_special_tokens(tok)
    else:
        check_tokenizer(tok)
    return tok


def check_tokenizer(tokenizer) -> None:
    """Raise if ``tokenizer`` does not split the pipeline's template prefix into exactly
    :data:`TEMPLATE_PREFIX_TOKENS` tokens, or splits a special token."""
    n = len(tokenizer(_template_prefix())["input_ids"])
    if n != TEMPLATE_PREFIX_TOKENS:
        raise AssertionError(f"template prefix is {n} tokens, the pipeline drops {TEMPLATE_PREFIX_TOKENS}")
    _check_special_tokens(tokenizer)


def _check_special_tokens(tokenizer) -> None:
    for special in SPECIAL_TOKENS:
        ids = tokenizer(special)["input_ids"]
        if ids != [tokenizer.convert_tokens_to_ids(special)]:
            raise AssertionError(f"{special} is not a single special token: {ids}")


def _build_text_encoder(tokenizer, text: dict | None = None, family: str = "edit"):
    """A random Qwen2.5-VL ("edit") or Qwen3-VL ("qwen21") whose config points at ``tokenizer``'s special tokens."""
    if family == "qwen21":
        from transformers import Qwen3VLConfig as Config
        from transformers import Qwen3VLForConditionalGeneration as Model

        base_text, vision = QWEN21_TEXT_CONFIG, QWEN21_VISION_CONFIG
    else:
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model

        base_text, vision = TEXT_CONFIG, VISION_CONFIG
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = -(-len(tokenizer) // 64) * 64  # padded, like the real 152064
    text_config = dict(base_text, **(text or {}))
    config = Config(
        text_config=dict(
            text_config,
            vocab_size=vocab_size,
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(vision, out_hidden_size=text_config["hidden_size"]),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    return Model(config).eval()


def make_tiny_model(
    path,
    zero_cond_t: bool = False,
    seed: int = 0,
    transformer: dict | None = None,
    vae: dict | None = None,
    text: dict | None = None,
    dtype: str = "fp32",
    family: str = "edit",
) -> pathlib.Path:
    """Build the tiny model and save it to ``path`` (created if missing); return the path.

    ``family``: "edit" (Qwen-Image-Edit-2509/2511, the default) or "qwen21" (Qwen-Image 2.1: see
    :func:`make_tiny_qwen21`; ``zero_cond_t`` is an Edit-2511 switch and is refused with it).

    ``zero_cond_t=True`` gives the Qwen-Image-Edit-2511 transformer variant. The same
    ``seed`` gives bitwise identical weights. ``transformer``: overrides of
    :data:`TRANSFORMER_CONFIG` (e.g. more layers for a model that will be trained); ``vae``: overrides
    of :data:`VAE_CONFIG` (e.g. :data:`VAE_4X`); ``text``: overrides of :data:`TEXT_CONFIG` (its width is also the
    transformer's ``joint_attention_dim``); ``dtype``: of the saved weights ("fp32" or "bf16").
    """
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPlusPipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    if family not in FAMILIES:
        raise UniRefError(f"family {family!r} is not one of {', '.join(FAMILIES)}")
    if family == "qwen21":
        if zero_cond_t:
            raise UniRefError(
                "zero_cond_t is a Qwen-Image-Edit-2511 switch; a Qwen-Image 2.1 model has no such option"
            )
        return make_tiny_qwen21(path, seed=seed, transformer=transformer, vae=vae, text=text, dtype=dtype)
    path = pathlib.Path(path)
    tokenizer = _build_tokenizer()
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**IMAGE_PROCESSOR_CONFIG),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**VIDEO_PROCESSOR_CONFIG),
    )
    torch.manual_seed(seed)
    transformer_config = dict(TRANSFORMER_CONFIG, **(transformer or {}))
    transformer = QwenImageTransformer2DModel(**transformer_config, zero_cond_t=zero_cond_t)
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(**dict(VAE_CONFIG, **(vae or {})))
    torch.manual_seed(seed)
    text_encoder = _build_text_encoder(tokenizer, text)
    _cast(dtype, transformer, vae, text_encoder)

    pipe = QwenImageEditPlusPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        processor=processor,
        transformer=transformer,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def make_tiny_qwen21(
    path,
    seed: int = 0,
    transformer: dict | None = None,
    vae: dict | None = None,
    text: dict | None = None,
    dtype: str = "fp32",
) -> pathlib.Path:
    """Build a tiny random Qwen-Image 2.1 model and save it to ``path``; return the path.

    The folder is what diffusers' ``QwenImage21Pipeline.from_pretrained`` loads: ``model_index.json``,
    ``transformer/`` (QwenImage21Transformer2DModel), ``vae/`` (AutoencoderKLQwenImage21: 16x, 64 latent channels,
    RGBA), ``text_encoder/`` (Qwen3-VL), ``processor/`` (Qwen3VLProcessor with its tokenizer, chat template and video
    processor), ``scheduler/``; safetensors only. It is written whole or not at all (`atomic.atomic_dir`); an
    existing non-empty ``path`` is refused rather than replaced. The same ``seed`` gives
    bitwise identical weights; ``transformer``, ``vae``, ``text``: overrides of the ``QWEN21_*_CONFIG`` dicts."""
    from diffusers import (
        AutoencoderKLQwenImage21,
        FlowMatchEulerDiscreteScheduler,
        QwenImage21Pipeline,
        QwenImage21Transformer2DModel,
    )
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    path = pathlib.Path(path)
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        raise UniRefError(f"{path} exists and is not an empty folder; give a new folder for the tiny model")
    # The 2.1 system prompt, taught to the tokenizer as whole words.
    tokenizer = _build_tokenizer(extra_lines=(SYSTEM_PROMPT,) * 4)
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**QWEN21_IMAGE_PROCESSOR_CONFIG),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(**QWEN21_VIDEO_PROCESSOR_CONFIG),
        chat_template=QWEN21_CHAT_TEMPLATE,
    )
    torch.manual_seed(seed)
    transformer = QwenImage21Transformer2DModel(**dict(QWEN21_TRANSFORMER_CONFIG, **(transformer or {})))
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage21(**dict(QWEN21_VAE_CONFIG, **(vae or {})))
    torch.manual_seed(seed)
    text_encoder = _build_text_encoder(tokenizer, text, family="qwen21")
    _cast(dtype, transformer, vae, text_encoder)
    pipe = QwenImage21Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        processor=processor,
        transformer=transformer,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(path) as partial:
        pipe.save_pretrained(partial, safe_serialization=True)
    return path


def _cast(dtype: str, *modules) -> None:
    """Weights saved in ``dtype`` ("fp32" as built, or "bf16")."""
    if dtype == "bf16":
        for module in modules:  # nn.Module.to: diffusers' own .to warns about fp32 keeps
            torch.nn.Module.to(module, torch.bfloat16)
