"""The neural rewards' speed: images/s of each, through rlds' own reward code, on random-weight
models of the real architectures saved as users' model folders (no download; random weights time
like trained ones). The tests build the same models at tiny sizes.

    python -m rlds.bench.rewards --out reward_bench.json     # CPU, or the GPU when there is one
    python -m rlds.bench.rewards --tiny                      # the same code, tiny models

- detector_composition: OWLv2 B/16 at 960 px (google/owlv2-base-patch16-ensemble's shapes);
- clip_parity: CLIP ViT-L/14 at 224 px (openai/clip-vit-large-patch14's);
- image_reward: BLIP's ViT-L and a 12-layer BERT (ImageReward-v1.0's), in its own Ray environment.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

# (text tower, vision tower) of each architecture, in transformers' config keys
OWLV2 = {"base": (dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                       max_position_embeddings=16),
                  dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=960, patch_size=16), 512),
         "tiny": (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       max_position_embeddings=32),
                  dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       image_size=64, patch_size=16), 32)}
CLIP = {"large": (dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       max_position_embeddings=77),
                  dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=224, patch_size=14), 768),
        "tiny": (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      max_position_embeddings=64),
                 dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=32, patch_size=8), 32)}
# BLIP's BERT (med_config.json of THUDM/ImageReward); `num_hidden_layers` is 12 there
MED_CONFIG = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
              "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
              "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert",
              "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2,
              "vocab_size": 30524, "encoder_width": 768, "add_cross_attention": True}


def byte_level_clip_tokenizer():
    """A CLIP tokenizer with a byte-level alphabet and no merges: every character is a token. The
    specials come last, so no real token has id 0 (OWL models read id 0 as a padded query)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"!pad": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(chars)})
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def _towers(spec: tuple, vocab_size: int) -> dict:
    text, vision, projection = spec
    ids = dict(vocab_size=vocab_size, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=0)
    return dict(text_config={**text, **ids}, vision_config=vision, projection_dim=projection)


def save_random_owlv2(folder: Path, size: str = "tiny") -> Path:
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2Processor
    from transformers.models.owlv2 import Owlv2ImageProcessorPil

    pixels = OWLV2[size][1]["image_size"]
    return _save_random(folder, OWLV2[size], lambda towers: Owlv2ForObjectDetection(Owlv2Config(**towers)),
                        lambda tokenizer: Owlv2Processor(tokenizer=tokenizer, image_processor=Owlv2ImageProcessorPil(
                            size={"height": pixels, "width": pixels})))


def save_random_clip(folder: Path, size: str = "tiny") -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    pixels = CLIP[size][1]["image_size"]
    return _save_random(folder, CLIP[size], lambda towers: CLIPModel(CLIPConfig(**towers)),
                        lambda tokenizer: CLIPProcessor(tokenizer=tokenizer, image_processor=CLIPImageProcessor(
                            size={"shortest_edge": pixels}, crop_size={"height": pixels, "width": pixels})))


def _save_random(folder: Path, spec: tuple, model, processor) -> Path:
    """A model of `spec`'s towers with random weights (seed 0) and its processor, saved as a folder."""
    import torch

    from rlds.hf import no_progress_bars

    tokenizer = byte_level_clip_tokenizer()
    torch.manual_seed(0)
    with no_progress_bars():
        model(_towers(spec, len(tokenizer.get_vocab()))).save_pretrained(folder)
    processor(tokenizer).save_pretrained(folder)
    return folder


def write_image_reward_config(folder: Path, bert_layers: int = 12) -> Path:
    """med_config.json and a vocab.txt of bert-base-uncased's size and special tokens (the words are
    made up past the letters): what `save_random_image_reward` and the reward read."""
    (folder / "med_config.json").write_text(json.dumps({**MED_CONFIG, "num_hidden_layers": bert_layers}))
    words = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += [chr(c) for c in range(33, 127)] + "a photo of cat dog red blue circle square".split()
    words += [f"w{i}" for i in range(30522 - len(words))]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    return folder


def save_random_image_reward(folder: str) -> None:
    """Inside image_reward's environment: a random ImageReward with its head re-initialised (so
    scores vary image to image), as ImageReward.pt beside the folder's med_config.json."""
    import torch
    from transformers import BertTokenizer

    from rlds.rewards.human_preference import allow_torchvision_without_its_ops, blip_tokenizer

    allow_torchvision_without_its_ops()
    from ImageReward.ImageReward import ImageReward as ImageRewardModel
    from ImageReward.models.BLIP import blip_pretrain

    blip_pretrain.init_tokenizer = lambda: blip_tokenizer(BertTokenizer, folder)
    torch.manual_seed(0)
    model = ImageRewardModel(med_config=str(Path(folder) / "med_config.json"), device="cpu")
    for p in model.mlp.parameters():
        torch.nn.init.normal_(p, std=0.2)
    # bfloat16 halves the file; loading casts to the model's float32
    torch.save({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, Path(folder) / "ImageReward.pt")


def images_per_second(name: str, args: dict, images: np.ndarray, prompts: list[str], seconds: float) -> float:
    from rlds.rewards import build_reward

    reward = build_reward(name, args)
    groups = np.repeat(np.arange(len(images) // 2), 2)
    reward(images[:2], prompts[:2], groups[:2])  # warm-up
    start, n = time.perf_counter(), 0
    while n == 0 or time.perf_counter() - start < seconds:
        reward(images, prompts, groups)
        n += len(images)
    return n / (time.perf_counter() - start)


def run(tiny: bool, seconds: float, threads: int, skip: tuple[str, ...] = ()) -> dict:
    import ray
    import torch

    from rlds.config import RewardConfig
    from rlds.distributed.reward import reward_runtime_env

    torch.set_num_threads(threads)
    root = Path(tempfile.mkdtemp(prefix="rlds-reward-bench-"))
    pixels = 64 if tiny else 512
    images = np.random.default_rng(0).integers(0, 256, (8, pixels, pixels, 3)).astype(np.uint8)
    device = "auto"
    out = {"images": list(images.shape), "threads": threads, "device": "cuda" if torch.cuda.is_available() else "cpu",
           "architectures": "tiny" if tiny else "real (random weights)", "images_per_s": {}}
    rates = out["images_per_s"]
    if "detector_composition" not in skip:
        folder = save_random_owlv2(root / "owlv2", "tiny" if tiny else "base")
        rates["detector_composition"] = images_per_second(
            "detector_composition", {"model": str(folder), "device": device, "batch_size": 8}, images,
            ["a cat next to a dog"] * 8, seconds)
    if "clip_parity" not in skip:
        folder = save_random_clip(root / "clip", "tiny" if tiny else "large")
        rates["clip_parity"] = images_per_second(
            "clip_parity", {"model": str(folder), "device": device, "batch_size": 8}, images,
            ["a photo of a doctor"] * 8, seconds)
    if "image_reward" not in skip:
        folder = root / "image_reward"
        folder.mkdir()
        write_image_reward_config(folder, 2 if tiny else 12)
        env = reward_runtime_env(RewardConfig(name="image_reward"))
        started = not ray.is_initialized()
        if started:
            ray.init(address="local", num_cpus=max(threads, 1), include_dashboard=False, log_to_driver=False)
        try:
            t0 = time.perf_counter()
            in_env = dict(runtime_env=env, num_cpus=1)
            ray.get(ray.remote(**in_env)(save_random_image_reward).remote(str(folder)))
            out["image_reward_environment_s"] = time.perf_counter() - t0
            args = {"model": str(folder), "tokenizer": str(folder), "device": device, "batch_size": 8}
            rates["image_reward"] = ray.get(ray.remote(**in_env)(_rate_in_env).remote(
                args, images, ["a photo of a cat"] * 8, seconds, threads))
        finally:
            if started:
                ray.shutdown()
    return out


def _rate_in_env(args, images, prompts, seconds, threads):
    import torch

    torch.set_num_threads(threads)
    return images_per_second("image_reward", args, images, prompts, seconds)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlds.bench.rewards", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="reward_bench.json")
    parser.add_argument("--tiny", action="store_true", help="tiny models: checks the code, not the speed")
    parser.add_argument("--seconds", type=float, default=20.0, help="time each reward for this long")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each reward")
    parser.add_argument("--skip", default="", help="comma-separated rewards to leave out")
    a = parser.parse_args(argv)
    out = run(a.tiny, a.seconds, a.threads, tuple(s for s in a.skip.split(",") if s))
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    for name, rate in out["images_per_s"].items():
        print(f"{name}: {rate:.2f} images/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
