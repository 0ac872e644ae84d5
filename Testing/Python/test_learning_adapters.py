"""LoRA and SALT adapters on the built-in U-Net (a tiny configuration for speed): exact start, frozen
base, gradients, merge, files with the base identity, and SALT's definition in the weight's 2D view."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from SegAssistLib.engine.network import NetworkConfig, build_network, save_checkpoint, weights_identity
from SegAssistLib.learning.adapters import (
    AdapterError,
    LoRALayer,
    SALTLayer,
    apply_adapter,
    base_identity,
    base_state_dict,
    load_adapter,
    read_adapter_file,
    remove_adapters,
)
from SegAssistLib.learning.adapters.layers import matrix_shape, weight_to_matrix

TINY = NetworkConfig(channels=(8, 16, 32), strides=(2, 2))
KINDS = ("lora", "salt")


def tiny_network(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_network(TINY).eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, TINY.in_channels, 16, 16, 16, generator=torch.Generator().manual_seed(1))


def perturb(adapters, scale: float = 0.1, seed: int = 3) -> None:
    """Move every adapter parameter away from its initial value, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_initialised_adapter_reproduces_base_exactly(kind: str, x: torch.Tensor):
    net = tiny_network()
    identity = weights_identity(net.state_dict())
    with torch.no_grad():
        expected = net(x)
    adapters = apply_adapter(net, kind, expected_identity=identity)
    kinds = {type(m) for m in net.modules() if isinstance(m, (LoRALayer, SALTLayer))}
    assert kinds == {LoRALayer if kind == "lora" else SALTLayer}
    # every convolution is adapted, the transposed ones included
    adapted = {type(layer.base) for layer in adapters.layers.values()}
    assert adapted == {nn.Conv3d, nn.ConvTranspose3d}
    with torch.no_grad():
        assert torch.equal(net(x), expected)
    assert base_identity(net) == identity


@pytest.mark.parametrize("kind", KINDS)
def test_only_adapter_parameters_receive_gradients_and_training_works(kind: str, x: torch.Tensor):
    net = tiny_network()
    before = {k: v.clone() for k, v in base_state_dict(net).items()}
    adapters = apply_adapter(net, kind)
    perturb(adapters, 0.05)  # so that B != 0 and every adapter parameter has a non-zero gradient
    adapter_ids = {id(p) for p in adapters.parameters()}
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == adapter_ids

    net.train()
    target = (x[:, :1] > 0.5).float()
    loss = nn.functional.binary_cross_entropy_with_logits(net(x), target)
    loss.backward()
    for name, p in net.named_parameters():
        if id(p) in adapter_ids:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, f"base parameter {name} received a gradient"

    optimiser = torch.optim.Adam(adapters.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        optimiser.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(net(x), target)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = base_state_dict(net)
    assert all(torch.equal(before[k], after[k]) for k in before), "training changed a base weight"


@pytest.mark.parametrize("kind", KINDS)
def test_merged_and_unmerged_outputs_agree_and_unmerge_restores_base(kind: str, x: torch.Tensor):
    net = tiny_network()
    with torch.no_grad():
        base_out = net(x)
    identity = base_identity(net)
    adapters = apply_adapter(net, kind)
    perturb(adapters)
    with torch.no_grad():
        unmerged = net(x)
        adapters.merge()
        assert adapters.merged
        merged = net(x)
    assert not torch.allclose(unmerged, base_out, atol=1e-3)  # the adapter does change the output
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    assert base_identity(net) == identity  # identity is that of the base, merged or not
    adapters.unmerge()
    with torch.no_grad():
        torch.testing.assert_close(net(x), unmerged, rtol=1e-5, atol=1e-5)
    plain = adapters.remove()
    assert not any(isinstance(m, (LoRALayer, SALTLayer)) for m in plain.modules())
    assert all(p.requires_grad for p in plain.parameters())  # flags restored
    assert weights_identity(plain.state_dict()) == identity
    with torch.no_grad():
        assert torch.equal(plain(x), base_out)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_with_base_identity(kind: str, x: torch.Tensor, tmp_path: Path):
    net = tiny_network()
    checkpoint = save_checkpoint(tmp_path / "base.pt", net, TINY, meta={})
    adapters = apply_adapter(net, kind)
    perturb(adapters)
    with torch.no_grad():
        expected = net(x)
    path = adapters.save(tmp_path / f"{kind}.pt", meta={"version": "v1", "cases": 3})
    assert path.stat().st_size < checkpoint.stat().st_size / 2  # small files
    with pytest.raises(FileExistsError):
        adapters.save(path)  # a saved version is never overwritten by accident

    info = read_adapter_file(path)
    assert info.base_identity == adapters.base_identity and info.meta == {"version": "v1", "cases": 3}
    assert info.config == adapters.config and info.trainable_parameters == adapters.trainable_parameter_count()

    fresh = tiny_network()  # same seed: the same base weights
    loaded = load_adapter(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=1e-6, atol=1e-6)
    for name, value in adapters.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value)
    merged_net = tiny_network()
    load_adapter(merged_net, path, merge=True)
    with torch.no_grad():
        torch.testing.assert_close(merged_net(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_refuses_another_base_model(kind: str, tmp_path: Path):
    net = tiny_network(seed=0)
    adapters = apply_adapter(net, kind)
    path = adapters.save(tmp_path / "a.pt")
    other = tiny_network(seed=1)
    with pytest.raises(AdapterError, match="was trained on base model"):
        load_adapter(other, path)
    assert not any(isinstance(m, (LoRALayer, SALTLayer)) for m in other.modules())  # left untouched
    with pytest.raises(AdapterError, match="not the expected base model"):
        apply_adapter(tiny_network(seed=1), kind, expected_identity=adapters.base_identity)


def test_bad_files_and_settings_are_refused_clearly(tmp_path: Path):
    with pytest.raises(AdapterError, match="not found"):
        read_adapter_file(tmp_path / "missing.pt")
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(AdapterError, match="not a SegAssist adapter file"):
        read_adapter_file(tmp_path / "other.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(AdapterError, match="cannot read"):
        read_adapter_file(tmp_path / "garbage.pt")
    with pytest.raises(AdapterError, match="unknown adapter kind"):
        apply_adapter(tiny_network(), "dora")
    with pytest.raises(AdapterError, match="rank"):
        apply_adapter(tiny_network(), "lora", rank=0)
    with pytest.raises(AdapterError, match="no layer named"):
        apply_adapter(tiny_network(), "salt", targets=["model.9.conv"])
    with pytest.raises(AdapterError, match="grouped convolution"):
        LoRALayer(nn.Conv3d(4, 4, 3, groups=2))
    net = tiny_network()
    adapters = apply_adapter(net, "lora")
    with pytest.raises(AdapterError, match="already carries adapters"):
        apply_adapter(net, "salt")
    with pytest.raises(AdapterError, match="JSON-compatible"):
        adapters.save(tmp_path / "x.pt", meta={"bad": object()})
    state = adapters.state_dict()
    state[next(iter(state))] = torch.zeros(1)
    with pytest.raises(AdapterError, match="expected shape"):
        adapters.load_state_dict(state)
    remove_adapters(net)
    assert not any(isinstance(m, LoRALayer) for m in net.modules())


def _flags(net: nn.Module) -> dict:
    return {key: p.requires_grad for key, p in net.named_parameters()}


def _with_one_frozen(net: nn.Module) -> nn.Module:
    """A network whose caller froze one parameter itself: refusals and removals must keep that too."""
    net.get_parameter("model.1.submodule.0.conv.bias").requires_grad_(False)
    return net


@pytest.mark.parametrize("kind, settings, message", [
    ("lora", {"rank": 0}, "LoRA rank must be"),
    ("salt", {"rank": 0}, r"SALT rank \(number of top singular values\) must be an integer >= 1"),
    ("salt", {"lora_rank": -1}, "SALT LoRA rank must be an integer >= 0"),
    ("salt", {"alpha": float("nan")}, "alpha must be a positive number"),
    ("lora", {}, r"layer 'model.2.conv' \(ConvTranspose3d\): its weight holds NaN or infinite values"),
    ("salt", {}, r"layer 'model.2.conv' \(ConvTranspose3d\): its weight holds NaN or infinite values"),
])
def test_a_refused_apply_leaves_the_network_as_it_was(kind: str, settings: dict, message: str):
    """The layers built before the refusal kept their base frozen (a caller that went on to train the
    whole network never updated them), and a NaN weight was a raw torch error from SALT's SVD."""
    net = _with_one_frozen(tiny_network())
    if not settings:  # the output layer, built last: every other layer was built (and frozen) before it
        with torch.no_grad():
            net.get_parameter("model.2.conv.weight").view(-1)[0] = float("nan")
    flags, modules = _flags(net), [type(m) for m in net.modules()]
    with pytest.raises(AdapterError, match=message):
        apply_adapter(net, kind, **settings)
    assert _flags(net) == flags and [type(m) for m in net.modules()] == modules


def test_a_refused_load_leaves_the_network_as_it_was(tmp_path: Path):
    path = apply_adapter(tiny_network(), "lora").save(tmp_path / "a.pt")
    payload = torch.load(path, weights_only=True)
    payload["config"]["rank"] = 0
    torch.save(payload, tmp_path / "rank0.pt")
    net = _with_one_frozen(tiny_network())
    flags = _flags(net)
    with pytest.raises(AdapterError, match="LoRA rank must be"):
        load_adapter(net, tmp_path / "rank0.pt")
    assert _flags(net) == flags and not any(isinstance(m, LoRALayer) for m in net.modules())


@pytest.mark.parametrize("kind", KINDS)
def test_remove_adapters_without_the_handle_restores_trainability(kind: str, x: torch.Tensor, tmp_path: Path):
    """remove_adapters left every base parameter frozen: the restored network could not be fine-tuned."""
    net = _with_one_frozen(tiny_network())
    flags = _flags(net)
    remove_adapters(load_adapter(net, apply_adapter(tiny_network(), kind).save(tmp_path / "a.pt")).network)
    assert _flags(net) == flags
    net(x).sum().backward()
    assert all((p.grad is not None) == flags[key] for key, p in net.named_parameters())


@pytest.mark.parametrize("change, message", [
    (lambda payload: payload.pop("format_version"), "SALT adapter of format 0"),
    (lambda payload: payload.update(meta="hello"), "damaged: its meta is str, not an object"),
    (lambda payload: payload.update(trainable_parameters="many"), "its trainable_parameters is 'many', not a number"),
    (lambda payload: payload["config"].update(targets="model.0.conv"),
     "its targets must be a list of layer names, got 'model.0.conv'"),
    (lambda payload: payload.update(config="salt"), "invalid adapter config 'salt'"),
])
def test_a_malformed_adapter_file_is_an_adapter_error_saying_what_is_wrong(change, message: str, tmp_path: Path):
    """A KeyError or ValueError instead: EngineSync retried such a file before every job (only an
    AdapterError is a lasting fault of the version), and the command line showed no clear reason."""
    payload = torch.load(apply_adapter(tiny_network(), "salt").save(tmp_path / "a.pt"), weights_only=True)
    change(payload)
    torch.save(payload, tmp_path / "bad.pt")
    net = tiny_network()
    with pytest.raises(AdapterError, match=message):
        load_adapter(net, tmp_path / "bad.pt")
    assert not any(isinstance(m, SALTLayer) for m in net.modules())


def test_a_salt_file_of_format_1_is_refused_and_a_lora_file_of_format_1_still_loads(x: torch.Tensor, tmp_path: Path):
    """Format 2 redefined SALT's low-rank part (it spans the whole weight): a format 1 SALT file's
    tensors mean something else, so it is refused with the reason; LoRA did not change."""
    for kind in KINDS:
        net = tiny_network()
        adapters = apply_adapter(net, kind)
        perturb(adapters)
        with torch.no_grad():
            expected = net(x)
        path = adapters.save(tmp_path / f"{kind}.pt")
        payload = torch.load(path, weights_only=True)
        payload["format_version"] = 1
        torch.save(payload, path)
        if kind == "salt":
            with pytest.raises(AdapterError, match="SALT adapter of format 1.*train the adapter again"):
                read_adapter_file(path)
        else:
            fresh = tiny_network()
            load_adapter(fresh, path)
            with torch.no_grad():
                torch.testing.assert_close(fresh(x), expected, rtol=1e-6, atol=1e-6)


def test_targets_select_layers():
    net = tiny_network()
    names = [n for n, m in net.named_modules() if isinstance(m, nn.ConvTranspose3d)]
    adapters = apply_adapter(net, "lora", targets=lambda name, m: isinstance(m, nn.ConvTranspose3d))
    assert sorted(adapters.layers) == sorted(names) and adapters.config.targets == tuple(names)


# ------------------------------------------------------------------- the weight's 2D view, SALT


def test_transposed_convolution_matrix_view_is_out_by_in_times_kernel():
    conv_t = nn.ConvTranspose3d(6, 3, kernel_size=3, stride=2, padding=1, output_padding=1)
    assert conv_t.weight.shape == (6, 3, 3, 3, 3)  # (in, out, k, k, k)
    assert matrix_shape(conv_t) == (3, 6 * 27)
    layer = LoRALayer(conv_t, rank=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    delta = layer.delta_weight()
    assert delta.shape == conv_t.weight.shape
    # dW has rank <= 2 in the out x (in*k^3) view, the view the adapter is defined in
    assert torch.linalg.matrix_rank(weight_to_matrix(conv_t, delta)) == 2
    # row o of the view holds everything that feeds output channel o
    assert torch.equal(weight_to_matrix(conv_t, conv_t.weight)[1], conv_t.weight[:, 1].reshape(-1))
    x = torch.randn(1, 6, 5, 5, 5)
    out = layer(x)
    assert out.shape == (1, 3, 10, 10, 10)
    torch.testing.assert_close(out, nn.functional.conv_transpose3d(x, conv_t.weight + delta, conv_t.bias, 2, 1, 1))


def test_salt_follows_its_definition():
    torch.manual_seed(0)
    conv = nn.Conv3d(4, 12, kernel_size=3, padding=1).double()
    w = weight_to_matrix(conv, conv.weight).detach().clone()
    layer = SALTLayer(conv, rank=3, lora_rank=2)
    s = torch.linalg.svdvals(w)
    n = s.numel()
    assert (layer.rank, layer.lora_rank) == (3, 2)
    assert layer.lora_A.shape == (2, w.shape[1]) and layer.lora_B.shape == (w.shape[0], 2)
    torch.testing.assert_close(layer.s_top, s[:3])

    def adapted_matrix():
        return w + layer.delta_matrix().detach()

    # scale and shift act on the top singular values only; the rest of the spectrum is unchanged
    with torch.no_grad():
        layer.scale.copy_(torch.tensor([2.0, 1.0, 0.5]))
        layer.shift.copy_(torch.tensor([0.0, 0.1, 0.0]))
    expected = torch.cat([torch.stack([2 * s[0], s[1] + 0.1, 0.5 * s[2]]), s[3:]])
    got = torch.linalg.svdvals(adapted_matrix())
    torch.testing.assert_close(got, expected.sort(descending=True).values)

    # the low-rank update stays in the remaining singular subspace: orthogonal to the top vectors
    with torch.no_grad():
        layer.scale.fill_(1.0)
        layer.shift.zero_()
        layer.lora_B.normal_()
    delta = layer.delta_matrix().detach()
    assert delta.abs().max() > 1e-3
    torch.testing.assert_close(layer.u_top.T @ delta, torch.zeros(3, delta.shape[1], dtype=delta.dtype))
    torch.testing.assert_close(delta @ layer.vh_top.T, torch.zeros(delta.shape[0], 3, dtype=delta.dtype))
    assert torch.linalg.matrix_rank(delta) == 2
    # ... and reaches the directions the weight does not use: a 12 x 108 matrix has a row space of
    # dimension 12, and an update confined to it (format 1) could follow a few % of a gradient
    row_space = torch.linalg.svd(w, full_matrices=False)[2]
    outside = delta - (delta @ row_space.T) @ row_space
    assert outside.norm() > 0.5 * delta.norm()

    # only the adapted singular values are kept non-negative, the matrix itself is not clamped
    with torch.no_grad():
        layer.lora_B.zero_()
        layer.shift.fill_(-1e6)
    assert torch.all(layer.adapted_singular_values() == 0)
    adapted = adapted_matrix()
    assert (adapted < 0).any() and (adapted > 0).any()
    torch.testing.assert_close(torch.linalg.svdvals(adapted)[: n - 3], s[3:])


def test_salt_on_a_one_channel_output_layer_has_no_rest():
    conv_t = nn.ConvTranspose3d(8, 1, kernel_size=3, stride=2, padding=1, output_padding=1)
    layer = SALTLayer(conv_t, rank=8, lora_rank=4)
    assert (layer.rank, layer.lora_rank) == (1, 0) and layer.lora_A is None
    assert sorted(layer.adapter_parameters()) == ["scale", "shift"]


def test_trainable_share_on_the_full_network():
    full = build_network(NetworkConfig())
    n_base = sum(p.numel() for p in full.parameters())
    lora = apply_adapter(full, "lora")
    assert lora.base_parameter_count() == n_base
    lora_share = lora.trainable_share()
    lora.remove()
    salt = apply_adapter(full, "salt")
    salt_share = salt.trainable_share()
    assert 0.5 * lora_share < salt_share < 1.5 * lora_share < 0.15  # top-r scales + a rank-4 update
    summary = salt.summary()
    assert summary["kind"] == "salt" and summary["base_parameters"] == n_base
