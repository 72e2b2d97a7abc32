"""Tiny random models saved to a folder, for running the real model engines without a hub.

Each builder writes a complete local model folder (config, weights, tokenizer, processor) that the
engine loads exactly as it would load a downloaded checkpoint, and returns the folder. The weights
are random, so the text they produce is noise: tests assert structure (status, engine, model,
timings, page sizes), never text.

Everything here imports torch and transformers inside the builders, so importing this module is
cheap; `scripts/setup --test` installs both, and the tests fail (never skip) without them.
"""

from __future__ import annotations

import json
import string
import textwrap
from pathlib import Path
from typing import Any

PAD, IMAGE, BOS, EOS, UNK = "<pad>", "<image>", "<s>", "</s>", "<unk>"
SPECIALS = [PAD, IMAGE, BOS, EOS, UNK]  # ids 0..4, in this order

# DeepSeek-OCR-2's vision tower yields 144 queries + 1 separator per view whatever the pixel size;
# with a 48 px global view, 48 px tiles, patch_size 1 and downsample_ratio 4 the processor emits
# ceil(48 / 1 / 4)² + 1 = 145 `<image>` tokens per view too, so the two agree.
DEEPSEEK_OCR2_VIEW_PX = 48


def char_tokenizer(model_max_length: int = 4096) -> Any:
    """A character-level fast tokenizer: ids 0-4 are the specials above, then printable ASCII."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[IMAGE],
        model_max_length=model_max_length,
    )


def build_deepseek_ocr2(folder: Path, *, seed: int = 0) -> Path:
    """A ≈650k-parameter random DeepSeek-OCR-2 (model_type `deepseek_ocr2`, native in transformers 5).

    Loadable with `AutoProcessor` + `AutoModelForImageTextToText`; the processor tiles pages larger
    than 48 px into 48 px local views, as the real one does at 768 px.
    """
    import torch
    from transformers import (
        DeepseekOcr2Config,
        DeepseekOcr2ForConditionalGeneration,
        DeepseekOcr2ImageProcessorPil,
        DeepseekOcr2Processor,
    )

    torch.manual_seed(seed)
    config = DeepseekOcr2Config(
        vision_config={
            "sam_config": {
                "hidden_size": 32,
                "output_channels": 16,
                "image_size": 16,
                "patch_size": 2,
                "window_size": 4,
                "global_attn_indexes": [1],
                "downsample_channels": [32, 64],
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "mlp_dim": 64,
            },
            "encoder_config": {
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
            },
        },
        text_config={
            "vocab_size": 128,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "n_routed_experts": 8,
            "n_shared_experts": 1,
            "mlp_layer_types": ["dense", "sparse"],
            "moe_intermediate_size": 64,
            "num_experts_per_tok": 2,
            "pad_token_id": 0,
            "bos_token_id": 2,
            "eos_token_id": 3,
        },
        image_token_id=SPECIALS.index(IMAGE),
    )
    model = DeepseekOcr2ForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.bos_token_id = 2
    model.generation_config.eos_token_id = 3
    processor = DeepseekOcr2Processor(
        image_processor=DeepseekOcr2ImageProcessorPil(
            size={"height": DEEPSEEK_OCR2_VIEW_PX, "width": DEEPSEEK_OCR2_VIEW_PX}, tile_size=DEEPSEEK_OCR2_VIEW_PX
        ),
        tokenizer=char_tokenizer(),
        patch_size=1,
        downsample_ratio=4,
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# The modeling file of a fake DeepSeek-OCR v1 checkpoint. transformers' trust_remote_code machinery
# loads it exactly like the real `modeling_deepseekocr.py`, and its `infer()` keeps the v1 contract
# the engine depends on:
# - it always creates `output_path` (and `output_path/images`, as the real one does);
# - it returns the text only with `eval_mode=True`, otherwise prints it and returns None — the
#   trap the engine must avoid; a prompt without `<image>` also gets None;
# - it calls `self.generate()` with the real one's hard-coded max_new_tokens=8192 and
#   no_repeat_ngram_size=35, so the engine's bound and repetition guard must get in there.
# The "language model" is deliberately a loop: embedding = identity, head = a transition table, so
# greedy decoding walks "abc abc abc ..." (other tokens lead to "a"), and no_repeat_ngram_size
# bends it into a near-loop now and then, the shape of DeepSeek-OCR's real runaway pages; it
# never emits EOS.
# Each call's arguments and generated-token count go to `output_path/infer_call.json` and, when
# the config names one, a `calls_log` file the test reads.
FAKE_DEEPSEEK_OCR_MODELING = """
from __future__ import annotations

import json
import os

import torch
from PIL import Image
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class FakeDeepseekOcrConfig(PretrainedConfig):
    model_type = "fake_deepseek_ocr"

    def __init__(self, vocab_size=128, calls_log=None, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = vocab_size
        self.calls_log = calls_log
        super().__init__(**kwargs)


class FakeDeepseekOcrModel(PreTrainedModel, GenerationMixin):
    config_class = FakeDeepseekOcrConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        return CausalLMOutput(logits=self.head(self.embed(input_ids)))

    def infer(self, tokenizer, prompt="", image_file="", output_path="", base_size=1024, image_size=640,
              crop_mode=True, test_compress=False, save_results=False, eval_mode=False):
        os.makedirs(output_path, exist_ok=True)
        os.makedirs(os.path.join(output_path, "images"), exist_ok=True)
        with Image.open(image_file) as image:
            width, height = image.size
        call = {
            "prompt": prompt, "image_file": image_file, "output_path": output_path, "base_size": base_size,
            "image_size": image_size, "crop_mode": crop_mode, "save_results": save_results,
            "eval_mode": eval_mode, "image_px": [width, height],
            "dtype": str(self.head.weight.dtype), "device": str(self.head.weight.device),
        }
        text = None
        if "<image>" in prompt:
            input_ids = tokenizer(prompt.replace("<image>", "") + " ", return_tensors="pt").input_ids
            output_ids = self.generate(
                input_ids.to(self.device), attention_mask=torch.ones_like(input_ids).to(self.device),
                max_new_tokens=8192, no_repeat_ngram_size=35, do_sample=False, use_cache=False,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )
            call["generated_tokens"] = output_ids.shape[1] - input_ids.shape[1]
            text = tokenizer.decode(output_ids[0, input_ids.shape[1]:], skip_special_tokens=True)
        with open(os.path.join(output_path, "infer_call.json"), "w") as f:
            json.dump(call, f)
        if self.config.calls_log:
            with open(self.config.calls_log, "a") as f:
                f.write(json.dumps(call) + "\\n")
        if eval_mode:
            return text
        print(text)
        return None
"""

LOOP = "abc "


def build_fake_deepseek_ocr(folder: Path, *, calls_log: Path | None = None) -> Path:
    """A trust_remote_code checkpoint with DeepSeek-OCR v1's `infer()` (see the modeling text above).

    config.json's `auto_map` points `AutoConfig`/`AutoModel` at `modeling_fake_deepseek_ocr.py` in the
    folder; the weights are safetensors (the engine passes `use_safetensors=True`).
    """
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    module = "modeling_fake_deepseek_ocr"
    (folder / f"{module}.py").write_text(textwrap.dedent(FAKE_DEEPSEEK_OCR_MODELING).lstrip())
    tokenizer = char_tokenizer()
    vocab = 128
    config: dict[str, Any] = {
        "model_type": "fake_deepseek_ocr",
        "architectures": ["FakeDeepseekOcrModel"],
        "auto_map": {"AutoConfig": f"{module}.FakeDeepseekOcrConfig", "AutoModel": f"{module}.FakeDeepseekOcrModel"},
        "vocab_size": vocab,
        "calls_log": str(calls_log) if calls_log else None,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    loop = tokenizer.convert_tokens_to_ids(list(LOOP))
    # head.weight[next, current]. Besides the loop, every printable token gets a small distinct
    # score and the specials a negative one, so a token that no_repeat_ngram_size bans is replaced
    # by text, never by EOS: the loop runs on, like the real thing, until something stops it.
    transitions = torch.zeros(vocab, vocab)
    transitions[len(SPECIALS) :, :] = (torch.arange(len(SPECIALS), vocab) % 13).unsqueeze(1) / 100
    transitions[: len(SPECIALS), :] = -1.0
    base = transitions.clone()
    transitions[loop[0], :] = 1.0
    for current, following in zip(loop, loop[1:] + loop[:1], strict=True):
        transitions[:, current] = base[:, current]
        transitions[following, current] = 1.0
    weights = {"embed.weight": torch.eye(vocab), "head.weight": transitions}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)
    return folder


QWEN_VISION = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]


def build_qwen2_vl(folder: Path, *, seed: int = 0) -> Path:
    """A tiny random Qwen2-VL (model_type `qwen2_vl`), for the `vllm` engine on a GPU host.

    vLLM's DeepSeek-OCR model builds its vision encoders (SAM ViT-B, CLIP-L) at their real, fixed
    sizes whatever the config says, so no tiny DeepSeek-OCR exists for it; Qwen2-VL is the smallest
    multimodal architecture vLLM loads whose every size comes from the config. head_dim 64 in both
    towers (what vLLM's attention kernels take), mrope_section summing to head_dim / 2.
    """
    import torch
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    torch.manual_seed(seed)
    tokenizer = char_tokenizer(model_max_length=16384)  # gpu-check decodes up to 8192 tokens a page
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE, *QWEN_VISION]})
    vocab = len(tokenizer)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_VISION}
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": vocab,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 16384,
            "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
            "bos_token_id": 2,
            "eos_token_id": 3,
            "pad_token_id": 0,
        },
        vision_config={
            "depth": 2,
            "embed_dim": 64,
            "hidden_size": 128,
            "num_heads": 1,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        video_token_id=ids["<|image_pad|>"],
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 3
    # pages become at most 256 patches of 14 px (64 image tokens after the 2×2 merge)
    image_processor = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=256 * 14 * 14)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    try:
        video_processor = Qwen2VLVideoProcessor()  # needs torchvision, which vLLM's venv has
    except ImportError:
        image_processor.save_pretrained(folder)  # enough for this machine's CPU check
        tokenizer.save_pretrained(folder)
        return folder
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}",
    )
    processor.save_pretrained(folder)
    return folder
