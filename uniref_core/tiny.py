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
"""

from __future__ import annotations

import json
import pathlib

import torch

__all__ = ["make_tiny_model", "VAE_4X", "check_tokenizer", "TEMPLATE_PREFIX_TOKENS", "SPECIAL_TOKENS"]

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


def _build_tokenizer():
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
    bpe.train_from_iterator(_corpus(), trainer=trainer)

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
    check_tokenizer(tok)
    return tok


def check_tokenizer(tokenizer) -> None:
    """Raise if ``tokenizer`` does not split the pipeline's template prefix into exactly
    :data:`TEMPLATE_PREFIX_TOKENS` tokens, or splits a special token."""
    n = len(tokenizer(_template_prefix())["input_ids"])
    if n != TEMPLATE_PREFIX_TOKENS:
        raise AssertionError(f"template prefix is {n} tokens, the pipeline drops {TEMPLATE_PREFIX_TOKENS}")
    for special in SPECIAL_TOKENS:
        ids = tokenizer(special)["input_ids"]
        if ids != [tokenizer.convert_tokens_to_ids(special)]:
            raise AssertionError(f"{special} is not a single special token: {ids}")


def _build_text_encoder(tokenizer, text: dict | None = None):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = -(-len(tokenizer) // 64) * 64  # padded, like the real 152064
    text_config = dict(TEXT_CONFIG, **(text or {}))
    config = Qwen2_5_VLConfig(
        text_config=dict(
            text_config,
            vocab_size=vocab_size,
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(VISION_CONFIG, out_hidden_size=text_config["hidden_size"]),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def make_tiny_model(
    path,
    zero_cond_t: bool = False,
    seed: int = 0,
    transformer: dict | None = None,
    vae: dict | None = None,
    text: dict | None = None,
    dtype: str = "fp32",
) -> pathlib.Path:
    """Build the tiny model and save it to ``path`` (created if missing); return the path.

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
    if dtype == "bf16":
        for module in (transformer, vae, text_encoder):  # nn.Module.to: diffusers' own .to warns about fp32 keeps
            torch.nn.Module.to(module, torch.bfloat16)

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
