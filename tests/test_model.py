"""Mechanics of the SD-FSMIS model on the tiny backbone (docs/model.md)."""

from __future__ import annotations

import shutil

import pytest
import torch
from diffusers import UNet2DConditionModel

from sdfsmis.config import TrainingConfig
from sdfsmis.io.backbone import BackboneNotFoundError, resolve_backbone
from sdfsmis.io.weights import CheckpointError, load_weights, save_weights
from sdfsmis.methods.sdfsmis.attention import SQILayout, install_sqi
from sdfsmis.methods.sdfsmis.model import SDFSMIS, widen_conv
from sdfsmis.methods.sdfsmis.reference import install_kv_bank, set_bank_mode


def _episode(resolution: int, supports: int = 1, queries: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(supports, 1, resolution, resolution, generator=g) * 2 - 1
    mask = torch.zeros(supports, 1, resolution, resolution)
    mask[..., resolution // 4 : resolution // 2, resolution // 3 : 3 * resolution // 4] = 1
    query = torch.rand(queries, 1, resolution, resolution, generator=g) * 2 - 1
    return image, mask, query


def _unet_inputs(unet: UNet2DConditionModel, supports: int, queries: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    sample = torch.randn(supports + queries, unet.config.in_channels, size, size, generator=g)
    context = torch.randn(supports + queries, 1, unet.config.cross_attention_dim, generator=g)
    return sample, context, torch.full((supports + queries,), 999)


def test_one_batch_sqi_equals_two_pass_kv_bank(tiny_backbone):
    unet = UNet2DConditionModel.from_pretrained(tiny_backbone / "unet").eval()
    sample, context, t = _unet_inputs(unet, supports=1, queries=3)
    with torch.no_grad():
        banks = install_kv_bank(unet)
        set_bank_mode(banks, "write")
        unet(sample[:1], t[:1], encoder_hidden_states=context[:1])
        set_bank_mode(banks, "read")
        reference = unet(sample[1:], t[1:], encoder_hidden_states=context[1:]).sample
        install_sqi(unet)
        one_batch = unet(sample, t, encoder_hidden_states=context, cross_attention_kwargs={"sqi": SQILayout(1)}).sample
    assert (one_batch[1:] - reference).abs().max().item() < 1e-5
    # and the SQI really changes something: plain self-attention on the query differs
    plain = unet(sample[1:], t[1:], encoder_hidden_states=context[1:]).sample
    assert (plain - reference).abs().max().item() > 1e-4


def test_support_rows_do_not_see_query_rows(tiny_backbone):
    unet = UNet2DConditionModel.from_pretrained(tiny_backbone / "unet").eval()
    install_sqi(unet)
    sample, context, t = _unet_inputs(unet, supports=2, queries=2)
    changed = sample.clone()
    changed[2:] = torch.randn_like(changed[2:])
    kwargs = {"cross_attention_kwargs": {"sqi": SQILayout(2)}}
    with torch.no_grad():
        a = unet(sample, t, encoder_hidden_states=context, **kwargs).sample
        b = unet(changed, t, encoder_hidden_states=context, **kwargs).sample
    assert torch.equal(a[:2], b[:2])
    assert not torch.allclose(a[2:], b[2:])


def test_cached_support_kv_equals_one_batch(tiny_model, tiny_config):
    image, mask, query = _episode(tiny_config.model.resolution, supports=2, queries=4)
    index = torch.tensor([0, 1, 1, 0])
    cached = tiny_model.predict_x0(tiny_model.encode_support(image, mask, cache_kv=True), query, index)
    one_batch = tiny_model.predict_x0(tiny_model.encode_support(image, mask, cache_kv=False), query, index)
    assert (cached - one_batch).abs().max().item() < 1e-5


def test_queries_encoded_once_predict_as_each_pass_encoding_them(tiny_model, tiny_config):
    """The pipeline keeps a batch's latents and runs each serving column on them: the same bits as
    a pass that encodes the queries itself."""
    image, mask, query = _episode(tiny_config.model.resolution, supports=2, queries=4)
    support = tiny_model.encode_support(image, mask)
    index = torch.tensor([[0, 1], [1, 0], [1, 1], [0, 0]])
    with torch.no_grad():
        once = tiny_model.predict_encoded(support, tiny_model.encode_queries(query), index)
        each = [tiny_model.predict(support, query, index[:, j]) for j in range(2)]
    assert len(once) == 2 and all(torch.equal(a.probability, b.probability) for a, b in zip(once, each))
    assert not torch.equal(once[0].probability, once[1].probability)  # the columns differ


def test_x0_is_the_negated_unet_output(tiny_model, tiny_config):
    image, mask, query = _episode(tiny_config.model.resolution)
    support = tiny_model.encode_support(image, mask)
    captured = []
    hook = tiny_model.unet.register_forward_hook(lambda module, args, out: captured.append(out.sample))
    with torch.no_grad():
        x0 = tiny_model.predict_x0(support, query, torch.zeros(3, dtype=torch.long))
    hook.remove()
    assert torch.equal(x0, -captured[-1])


def test_vtct_token_shape_and_mask_dependence(tiny_model, tiny_config):
    image, mask, _ = _episode(tiny_config.model.resolution, supports=2)
    with torch.no_grad():
        token = tiny_model.condition_token(image, mask)
        other_mask = torch.zeros_like(mask)
        other_mask[..., :8, :8] = 1
        other = tiny_model.condition_token(image, other_mask)
    assert token.shape == (2, 1, 768)
    assert (token - other).abs().max().item() > 1e-4


@pytest.mark.parametrize("init", ["repeat_half", "zero"])
def test_widened_conv_reproduces_pretrained_conv(init):
    conv = torch.nn.Conv2d(4, 16, 3, padding=1)
    wide = widen_conv(conv, init)
    x = torch.randn(2, 4, 8, 8)
    extra = x if init == "repeat_half" else torch.randn_like(x)
    with torch.no_grad():
        assert torch.allclose(wide(torch.cat([x, extra], dim=1)), conv(x), atol=1e-6)
    assert wide.in_channels == 8


def test_model_input_convs_are_initialised_from_pretrained(tiny_backbone, tiny_model):
    unet = UNet2DConditionModel.from_pretrained(tiny_backbone / "unet")
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        expected = unet.conv_in(x)
        for conv in (tiny_model.conv_in, tiny_model.conv_in_ref):
            assert torch.allclose(conv(torch.cat([x, x], dim=1)), expected, atol=1e-6)


def test_save_load_reproduces_prediction_bit_for_bit(tiny_backbone, tiny_config, tiny_model, tmp_path):
    with torch.no_grad():  # stand-in for fine-tuning: every trainable weight moves
        for group in tiny_model.parameter_groups(TrainingConfig(lr_unet=1.0, lr_mlp=1.0)):
            for p in group["params"]:
                p.add_(torch.randn_like(p) * 0.01)
    image, mask, query = _episode(tiny_config.model.resolution)
    before = tiny_model.segment(tiny_model.encode_support(image, mask), query)
    path = save_weights(tiny_model, tmp_path / "ckpt", metadata={"iteration": 7})
    fresh = SDFSMIS.from_backbone(tiny_backbone, tiny_config).eval()
    assert not torch.equal(fresh.segment(fresh.encode_support(image, mask), query), before)
    assert load_weights(fresh, path)["iteration"] == 7
    assert torch.equal(fresh.segment(fresh.encode_support(image, mask), query), before)


def test_checkpoint_of_another_shape_is_refused(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    path = save_weights(tiny_model, tmp_path / "w.safetensors")
    tensors = load_file(path)
    tensors["vtct.net.0.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match="another shape"):
        load_weights(tiny_model, path)
    del tensors["vtct.net.0.weight"]
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match="missing"):
        load_weights(tiny_model, path)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_weights(tiny_model, path)


def test_training_step_reduces_loss_on_one_episode(tiny_model, tiny_config):
    image, mask, query = _episode(tiny_config.model.resolution, queries=1)
    query_mask = torch.roll(mask, 2, dims=-1)
    tiny_model.train()
    optimiser = torch.optim.AdamW(tiny_model.parameter_groups(TrainingConfig(lr_unet=1e-3, lr_mlp=1e-3)))
    losses = []
    for _ in range(15):
        loss = tiny_model.training_loss(image, mask, query, query_mask, torch.Generator().manual_seed(0))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert all(p.grad is None for p in tiny_model.codec.parameters())
    assert all(p.grad is None for p in tiny_model.dinov2.parameters())
    assert losses[-1] < 0.5 * losses[0]


def test_missing_backbone_folder_names_it_and_the_fix(tiny_backbone, tmp_path):
    with pytest.raises(BackboneNotFoundError, match="does not exist.*sdfsmis download"):
        resolve_backbone(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_backbone, broken)
    shutil.rmtree(broken / "dinov2")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(BackboneNotFoundError) as error:
        resolve_backbone(broken)
    message = str(error.value)
    assert "dinov2/ (folder)" in message and "unet/diffusion_pytorch_model.safetensors" in message
    assert "sdfsmis download" in message and "make-tiny" in message


def test_default_hub_backbone_offline_gives_clear_error(monkeypatch, tiny_config, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(BackboneNotFoundError, match="sdfsmis download"):
        SDFSMIS.from_backbone("default", tiny_config)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_model, tiny_config):
    image, mask, query = _episode(tiny_config.model.resolution, queries=1)
    query_mask = torch.roll(mask, 3, dims=-1)
    tiny_model.train()

    def loss_and_grads():
        tiny_model.zero_grad()
        loss = tiny_model.training_loss(image, mask, query, query_mask, torch.Generator().manual_seed(1))
        loss.backward()
        return loss.item(), [p.grad.clone() for p in tiny_model.unet.parameters() if p.grad is not None]

    plain_loss, plain = loss_and_grads()
    tiny_model.unet.enable_gradient_checkpointing()
    checkpointed_loss, checkpointed = loss_and_grads()
    assert checkpointed_loss == pytest.approx(plain_loss, abs=1e-6)
    assert len(plain) == len(checkpointed) > 0
    assert max((a - b).abs().max().item() for a, b in zip(plain, checkpointed)) < 1e-5
