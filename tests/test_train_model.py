"""ModelConfig, TinyGPT and build_model: sizes, the forward contract, deterministic init, the optional HF path."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
import types

import pytest
import torch

from legion_swarm.config import PRESETS, ModelConfig
from legion_swarm.errors import ConfigError, ModelError
from legion_swarm.train.model import INIT_STD, HFCausalLM, TinyGPT, build_model

pytestmark = pytest.mark.timeout(60)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def params_sha256(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ config


def test_presets_resolve_into_explicit_fields_and_overrides_win() -> None:
    cfg = ModelConfig(preset="small")
    assert (cfg.n_layer, cfg.n_head, cfg.d_model, cfg.seq_len) == (6, 6, 384, 256)
    assert ModelConfig().seq_len == 128 and ModelConfig().vocab_size == 257 and ModelConfig().dropout == 0.0
    mixed = ModelConfig(preset="small", n_layer=2, seq_len=64)
    assert (mixed.n_layer, mixed.d_model, mixed.seq_len) == (2, 384, 64)
    hf = ModelConfig(preset="hf:gpt2")
    assert hf.is_hf and hf.d_model == PRESETS["small"]["d_model"]


def test_config_round_trips_through_a_plain_dict() -> None:
    cfg = ModelConfig(preset="custom", n_layer=3, n_head=2, d_model=32, seq_len=48, dropout=0.1, seed=7)
    d = cfg.to_dict()
    assert d == {
        "preset": "custom", "n_layer": 3, "n_head": 2, "d_model": 32, "seq_len": 48, "vocab_size": 257,
        "dropout": 0.1, "seed": 7,
    }  # fmt: skip
    assert ModelConfig.from_dict(d) == cfg
    # A TOML file says dropout = 0: the normalised config must serialise (and hash) like the one saying 0.0.
    from_toml = ModelConfig.from_dict({"preset": "tiny", "dropout": 0})
    assert from_toml.to_dict() == ModelConfig().to_dict()
    assert isinstance(from_toml.dropout, float)
    assert ModelConfig.from_dict(ModelConfig().to_dict()).to_dict() == ModelConfig().to_dict()


def test_from_dict_rejects_unknown_keys_with_a_clear_error() -> None:
    with pytest.raises(ModelError, match=r"unknown \[model\] keys: n_layers .*known: preset, n_layer"):
        ModelConfig.from_dict({"preset": "tiny", "n_layers": 4})
    with pytest.raises(ModelError, match="table"):
        ModelConfig.from_dict(["tiny"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"preset": "huge"}, "unknown model preset 'huge'"),
        ({"preset": "custom", "n_layer": 2}, "needs explicit n_head, d_model, seq_len"),
        ({"d_model": 130}, r"d_model \(130\) must be a multiple of n_head \(4\)"),
        ({"n_layer": 0}, "n_layer must be >= 1"),
        ({"n_head": True}, "n_head must be an integer"),
        ({"seq_len": 12.0}, "seq_len must be an integer"),
        ({"vocab_size": 1}, "vocab_size must be >= 2"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"dropout": "0.1"}, "dropout must be a number"),
        ({"seed": -1}, "seed must be in"),
        ({"preset": "hf:"}, "expected hf:<model_type>"),
        ({"preset": "hf:../x"}, "expected hf:<model_type>"),
    ],
)
def test_invalid_model_configs_raise_model_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ModelError, match=message) as info:
        ModelConfig(**kwargs)
    assert isinstance(info.value, ConfigError)


# ------------------------------------------------------------------------------------------------ TinyGPT


@pytest.mark.parametrize(("preset", "target"), [("tiny", 1e6), ("small", 10e6), ("medium", 50e6)])
def test_preset_parameter_counts(preset: str, target: float) -> None:
    cfg = ModelConfig(preset=preset)
    model = build_model(cfg)
    count = n_params(model)
    assert 0.75 * target <= count <= 1.25 * target, f"{preset}: {count} parameters"
    # The closed form counts the tied embedding once: a separate output head would add vocab * d_model.
    L, d, V, T = cfg.n_layer, cfg.d_model, cfg.vocab_size, cfg.seq_len
    assert count == L * (12 * d * d + 13 * d) + (V + T) * d + 2 * d
    assert isinstance(model, TinyGPT) and model.num_params() == count


def test_forward_shapes_and_initial_loss_near_uniform() -> None:
    model = build_model(ModelConfig(preset="tiny"))
    gen = torch.Generator().manual_seed(1)
    seq = torch.randint(0, 257, (4, 129), generator=gen)
    idx, targets = seq[:, :-1], seq[:, 1:]
    logits, loss = model(idx, targets)
    assert logits.shape == (4, 128, 257) and logits.dtype == torch.float32
    assert loss is not None and loss.shape == ()
    # A fresh model is close to a uniform guess over the 257 ids.
    assert abs(loss.item() - math.log(257)) < 0.15
    manual = torch.nn.functional.cross_entropy(logits.reshape(-1, 257), targets.reshape(-1))
    assert torch.allclose(loss, manual)
    short_logits, none = model(idx[:, :10])
    assert none is None and short_logits.shape == (4, 10, 257)
    with pytest.raises(ValueError, match="exceeds the model's seq_len 128"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_attention_is_causal_and_the_head_is_tied() -> None:
    model = build_model(ModelConfig(preset="custom", n_layer=2, n_head=2, d_model=32, seq_len=16)).eval()
    idx = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 257
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert torch.equal(a[:, :10], b[:, :10])  # positions before the change cannot see it
    assert not torch.allclose(a[:, 10:], b[:, 10:])
    with torch.no_grad():
        model.wte.weight[5].zero_()  # the output head reads the embedding matrix: logit 5 becomes 0 everywhere
        c, _ = model(idx)
    assert torch.count_nonzero(c[..., 5]) == 0


def test_gpt2_initialisation() -> None:
    cfg = ModelConfig(preset="small")
    model = build_model(cfg)
    residual = INIT_STD / math.sqrt(2 * cfg.n_layer)
    for name, param in model.named_parameters():
        p = param.detach()
        if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
            assert abs(float(p.std()) - residual) < 0.05 * residual, name
        elif name.endswith("ln1.weight") or name.endswith("ln2.weight") or name == "ln_f.weight":
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith(".bias"):
            assert torch.count_nonzero(p) == 0, name
        else:
            assert abs(float(p.std()) - INIT_STD) < 0.05 * INIT_STD, name
            assert abs(float(p.mean())) < 0.002, name


def test_init_is_deterministic_and_ignores_the_global_rng() -> None:
    cfg = ModelConfig(preset="tiny", seed=3)
    torch.manual_seed(1)
    before = torch.get_rng_state()
    a = build_model(cfg)
    assert torch.equal(torch.get_rng_state(), before)  # building does not consume the global RNG either
    torch.manual_seed(12345)
    torch.rand(100)
    b = build_model(cfg)
    pairs = list(zip(a.state_dict().items(), b.state_dict().items(), strict=True))
    assert all(na == nb and torch.equal(ta, tb) for (na, ta), (nb, tb) in pairs)
    c = build_model(ModelConfig(preset="tiny", seed=4))
    assert not torch.equal(a.wte.weight, c.wte.weight)
    assert not torch.equal(a.blocks[0].attn.qkv.weight, c.blocks[0].attn.qkv.weight)
    assert all(torch.isfinite(p).all() for p in a.parameters())


@pytest.mark.usefixtures("real_processes")
def test_init_is_bit_identical_in_another_process() -> None:
    code = (
        "import hashlib, torch; torch.manual_seed(99)\n"
        "from legion_swarm.config import ModelConfig\n"
        "from legion_swarm.train.model import build_model\n"
        "m = build_model(ModelConfig(preset='tiny', seed=3)); h = hashlib.sha256()\n"
        "for n, p in m.named_parameters(): h.update(n.encode()); h.update(p.detach().numpy().tobytes())\n"
        "print(h.hexdigest())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50, check=True)
    assert out.stdout.strip() == params_sha256(build_model(ModelConfig(preset="tiny", seed=3)))


def test_dropout_only_while_training() -> None:
    model = build_model(ModelConfig(preset="custom", n_layer=1, n_head=2, d_model=16, seq_len=8, dropout=0.5))
    idx = torch.randint(0, 257, (2, 8), generator=torch.Generator().manual_seed(0))
    model.train()
    torch.manual_seed(0)
    a, _ = model(idx)
    b, _ = model(idx)
    assert not torch.equal(a, b)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(idx)[0], model(idx)[0])


# ------------------------------------------------------------------------------------------- Hugging Face


def test_hf_preset_without_transformers_raises_model_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail, installed or not
    with pytest.raises(ModelError, match="needs the transformers package: pip install transformers"):
        build_model(ModelConfig(preset="hf:gpt2"))
    with pytest.raises(ModelError, match="use build_model"):
        TinyGPT(ModelConfig(preset="hf:gpt2"))


class _StubCausalLM(torch.nn.Module):
    """Stands in for a transformers *ForCausalLM: initialised from the global RNG, returns an output object."""

    def __init__(self, config: types.SimpleNamespace) -> None:
        super().__init__()
        self.config = config
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.head = torch.nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, input_ids: torch.Tensor) -> types.SimpleNamespace:
        return types.SimpleNamespace(logits=self.head(self.embed(input_ids)))


def _stub_transformers() -> types.ModuleType:
    stub = types.ModuleType("transformers")
    known = {"gpt2", "llama"}

    def for_model(model_type: str, **kwargs: object) -> types.SimpleNamespace:
        if model_type not in known:
            raise ValueError(f"Unrecognized model identifier: {model_type}")
        return types.SimpleNamespace(model_type=model_type, **kwargs)

    stub.AutoConfig = types.SimpleNamespace(for_model=for_model)  # type: ignore[attr-defined]
    stub.AutoModelForCausalLM = types.SimpleNamespace(from_config=_StubCausalLM)  # type: ignore[attr-defined]
    return stub


def test_hf_models_are_wrapped_to_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", _stub_transformers())
    cfg = ModelConfig(preset="hf:llama", n_layer=2, n_head=2, d_model=16, seq_len=32, dropout=0.1, seed=5)
    before = torch.get_rng_state()
    model = build_model(cfg)
    assert torch.equal(torch.get_rng_state(), before)
    assert isinstance(model, HFCausalLM)
    inner = model.model.config
    assert (inner.hidden_size, inner.num_hidden_layers, inner.num_attention_heads) == (16, 2, 2)
    assert (inner.max_position_embeddings, inner.intermediate_size, inner.vocab_size) == (32, 64, 257)
    assert inner.attention_dropout == 0.1 and inner.resid_pdrop == 0.1
    seq = torch.randint(0, 257, (2, 9), generator=torch.Generator().manual_seed(0))
    logits, loss = model(seq[:, :-1], seq[:, 1:])
    assert logits.shape == (2, 8, 257)
    # The targets are already shifted: the wrapper must not shift them again.
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits.reshape(-1, 257), seq[:, 1:].reshape(-1)))
    assert model(seq)[1] is None
    torch.manual_seed(777)
    again = build_model(cfg)
    assert params_sha256(again) == params_sha256(model)
    with pytest.raises(ModelError, match="unknown Hugging Face model type 'nonsense'"):
        build_model(ModelConfig(preset="hf:nonsense"))
