"""Low-memory mode gives the same images with the text encoder streamed; the prompt cache encodes once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kolors import KolorsError, KolorsPipeline
from kolors.memory import PromptCache
from kolors.weights.stream import WeightStream, on_device, streaming_units

SIZE = dict(height=64, width=64)


def load(model_dir, **kwargs) -> KolorsPipeline:
    pipe = KolorsPipeline.from_pretrained(model_dir, device="cpu", **{"dtype": torch.float32, **kwargs})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def normal(tiny_model_dir):
    return load(tiny_model_dir, prompt_cache=0)


@pytest.fixture(scope="module")
def low(tiny_model_dir):
    return load(tiny_model_dir, memory="low")


def count_encodes(pipe: KolorsPipeline) -> list[int]:
    calls = [0]
    pipe.text_encoder.register_forward_pre_hook(lambda m, args: calls.__setitem__(0, calls[0] + 1))
    return calls


def materialized(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if not p.is_meta)


# ---------------------------------------------------------------------------------------------------- low memory


CASES = {
    "cfg": dict(prompt="一张瓢虫的照片，微距", guidance_scale=5.0),
    "batch": dict(prompt=["a red car", "一只猫"], negative_prompt=["", "模糊"], guidance_scale=5.0),
    "no-cfg": dict(prompt="a photo of a cat", guidance_scale=1.0, num_images_per_prompt=2),
}


@pytest.mark.parametrize("case", CASES)
def test_low_memory_gives_the_same_image(normal, low, case):
    kwargs = {**SIZE, **CASES[case], "num_inference_steps": 3, "seed": 11, "output_type": "np"}
    ours, theirs = low(**kwargs).images, normal(**kwargs).images
    assert theirs.std() > 0.01
    np.testing.assert_array_equal(ours, theirs)


def test_low_memory_image_to_image(normal, low):
    init = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))
    kwargs = dict(prompt="a cat", image=init, strength=0.6, num_inference_steps=4, seed=3, output_type="np")
    np.testing.assert_array_equal(low(**kwargs).images, normal(**kwargs).images)


def test_text_encoder_is_released_after_encoding(low, normal):
    te = low.text_encoder
    assert materialized(te) == 0  # nothing after loading either
    biggest_unit = max(
        sum(p.numel() for name, p in te.named_parameters() if name.startswith(unit + "."))
        for unit in streaming_units(te)
    )
    seen = []
    handles = [
        m.register_forward_hook(lambda m, args, out: seen.append(materialized(te))) for m in te.modules()
    ]
    try:
        low.encode_prompt("a red car", "blurry")
    finally:
        for h in handles:
            h.remove()
    assert max(seen) > 0  # the hooks saw the layers while they ran...
    assert max(seen) <= biggest_unit  # ...one unit at a time...
    assert materialized(te) == 0  # ...and nothing is left
    assert te.rotary_pos_emb.inv_freq.device.type == "cpu"  # the small rest stays resident
    # The UNet and VAE stay loaded on CPU (denoising needs the UNet whole; see kolors.memory).
    assert materialized(low.unet) == sum(p.numel() for p in normal.unet.parameters())


def test_streamed_embeddings_equal_the_loaded_ones(normal, low):
    a = normal.encode_prompt(["a red car", "一只猫"], ["", "模糊"])
    b = low.encode_prompt(["a red car", "一只猫"], ["", "模糊"])
    for x, y in zip(
        (a.prompt_embeds, a.pooled, a.negative_prompt_embeds, a.negative_pooled),
        (b.prompt_embeds, b.pooled, b.negative_prompt_embeds, b.negative_pooled),
        strict=True,
    ):
        assert torch.equal(x, y)


def test_low_memory_fp16_shards_in_bf16(tiny_model_dir_fp16):
    """The real layout (fp16 text encoder in shards) converted to bf16 while streaming: same as a normal load."""
    kwargs = dict(dtype=torch.bfloat16)
    a, b = load(tiny_model_dir_fp16, **kwargs), load(tiny_model_dir_fp16, memory="low", **kwargs)
    call = dict(prompt="a red car", **SIZE, num_inference_steps=2, seed=5, output_type="np")
    np.testing.assert_array_equal(b(**call).images, a(**call).images)


def test_weight_stream_fetches_one_unit_at_a_time():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(3, 3) for _ in range(3))
            self.register_buffer("scale", torch.tensor(2.0))

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x * self.scale

    source = Net()
    weights = {k: v.clone() for k, v in source.state_dict().items()}
    expected = source(torch.ones(1, 3))
    with torch.device("meta"):
        net = Net()
    fetched = []

    def fetch(keys):
        fetched.append(sorted(keys))
        return {k: weights[k] for k in keys}

    stream = WeightStream(net, fetch)
    assert list(stream.units) == ["layers.0", "layers.1", "layers.2"] and net.scale.item() == 2.0
    assert torch.equal(net(torch.ones(1, 3)), expected)
    assert fetched[1:] == [[f"layers.{i}.bias", f"layers.{i}.weight"] for i in range(3)]
    assert all(p.is_meta for p in net.parameters())


def test_on_device_parks_the_module_back():
    module = torch.nn.Linear(3, 2)
    weight = module.weight
    with on_device(module, torch.device("meta")):
        assert module.weight.is_meta and module.bias.is_meta
    assert module.weight is weight and not weight.is_meta


# ---------------------------------------------------------------------------------------------------- prompt cache


def test_prompt_cache_encodes_once(tiny_model_dir, normal):
    pipe = load(tiny_model_dir)  # normal mode: the cache is on by default
    assert pipe.prompt_cache.size > 0
    calls = count_encodes(pipe)
    kwargs = dict(prompt="a red car", **SIZE, num_inference_steps=2, output_type="np")
    first, second = pipe(**kwargs, seed=1).images, pipe(**kwargs, seed=2).images
    assert calls[0] == 1 and pipe.prompt_cache.hits == 1
    np.testing.assert_array_equal(first, normal(**kwargs, seed=1).images)
    np.testing.assert_array_equal(second, normal(**kwargs, seed=2).images)
    pipe(**kwargs, negative_prompt="blurry", seed=1)  # another negative prompt is another entry
    pipe(**kwargs, guidance_scale=1.0, seed=1)  # no negatives at all too
    assert calls[0] == 3


def test_low_memory_cache_is_off_unless_asked(tiny_model_dir, low):
    calls = count_encodes(low)
    low.encode_prompt("a red car")
    low.encode_prompt("a red car")
    assert calls[0] == 2 and low.prompt_cache.size == 0
    cached = load(tiny_model_dir, memory="low", prompt_cache=2)
    calls = count_encodes(cached)
    assert cached.encode_prompt("a red car") is cached.encode_prompt("a red car")
    assert calls[0] == 1


def test_prompt_cache_evicts_the_least_recently_used():
    cache = PromptCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "b" is now the oldest
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3 and len(cache) == 2
    off = PromptCache(0)
    off.put("a", 1)
    assert off.get("a") is None and len(off) == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(memory="tiny"), "unknown memory mode 'tiny'"),
        (dict(prompt_cache=-1), "prompt_cache must be"),
        (dict(prompt_cache=True), "prompt_cache must be"),
    ],
)
def test_bad_memory_options(tmp_path, kwargs, match):
    with pytest.raises(KolorsError, match=match):  # before the (missing) model is looked at
        KolorsPipeline.from_pretrained(tmp_path / "absent", **kwargs)


def test_cli_low_memory_flag(monkeypatch, tmp_path):
    from kolors import cli

    seen = {}

    def from_pretrained(model, **kwargs):
        seen.update(kwargs)
        raise KolorsError("stop here")

    monkeypatch.setattr(KolorsPipeline, "from_pretrained", staticmethod(from_pretrained))
    monkeypatch.setattr(cli, "check_hub", lambda model: None)  # the hub "answers" (no network here)
    out = str(tmp_path / "x.png")
    assert cli.main(["generate", "a cat", "--low-memory", "--output", out]) == cli.EXIT_BAD_INPUT
    assert seen["memory"] == "low"
    assert cli.main(["generate", "a cat", "--output", out]) == cli.EXIT_BAD_INPUT
    assert seen["memory"] == "normal"
