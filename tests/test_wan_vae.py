"""Wan2.1 VAE: released key layout, causal streaming == whole decode, encode, loading, chunked video writing."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

import flowcache.decode_save as ds
from flowcache.decode_save import framewise_decoder, stream_decode_to_video, wan_stream_decoder
from flowcache.demo.codec import DemoCodec
from flowcache.errors import CheckpointError, InputError
from flowcache.latent_format import wan_to_model_space, wan_to_raw
from flowcache.models.wan_vae import WanVAE, WanVAECodec, load_wan_vae
from flowcache.video import VideoWriter, read_video

# Shapes of the released Wan2.1_VAE.pth / wan_2.1_vae.safetensors, from the reference notes §3.1.
REFERENCE_KEYS = {
    "encoder.conv1.weight": (96, 3, 3, 3, 3),
    "encoder.downsamples.0.residual.0.gamma": (96, 1, 1, 1),
    "encoder.downsamples.2.resample.1.weight": (96, 96, 3, 3),
    "encoder.downsamples.3.shortcut.weight": (192, 96, 1, 1, 1),
    "encoder.downsamples.5.time_conv.weight": (192, 192, 3, 1, 1),
    "encoder.downsamples.6.residual.2.weight": (384, 192, 3, 3, 3),
    "encoder.downsamples.8.time_conv.weight": (384, 384, 3, 1, 1),
    "encoder.downsamples.10.residual.6.bias": (384,),
    "encoder.middle.1.norm.gamma": (384, 1, 1),
    "encoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
    "encoder.middle.1.proj.weight": (384, 384, 1, 1),
    "encoder.head.0.gamma": (384, 1, 1, 1),
    "encoder.head.2.weight": (32, 384, 3, 3, 3),
    "conv1.weight": (32, 32, 1, 1, 1),
    "conv2.weight": (16, 16, 1, 1, 1),
    "decoder.conv1.weight": (384, 16, 3, 3, 3),
    "decoder.middle.0.residual.0.gamma": (384, 1, 1, 1),
    "decoder.upsamples.3.resample.1.weight": (192, 384, 3, 3),
    "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
    "decoder.upsamples.4.shortcut.weight": (384, 192, 1, 1, 1),
    "decoder.upsamples.7.time_conv.weight": (768, 384, 3, 1, 1),
    "decoder.upsamples.8.residual.3.gamma": (192, 1, 1, 1),
    "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
    "decoder.upsamples.14.residual.6.weight": (96, 96, 3, 3, 3),
    "decoder.head.0.gamma": (96, 1, 1, 1),
    "decoder.head.2.weight": (3, 96, 3, 3, 3),
}


def tiny_vae(seed: int = 0, dim: int = 8) -> WanVAE:
    torch.manual_seed(seed)
    vae = WanVAE(dim=dim).eval().requires_grad_(False)
    for p in vae.parameters():
        p.data.normal_(0, 0.1)  # visible, non-saturating outputs (default init decodes to near-constant grey)
    return vae


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vae(one_thread) -> WanVAE:
    return tiny_vae()


def test_full_size_key_names_and_shapes():
    with torch.device("meta"):
        sd = WanVAE().state_dict()
    for k, shape in REFERENCE_KEYS.items():
        assert k in sd, k
        assert tuple(sd[k].shape) == shape, k
    assert "decoder.upsamples.15.residual.0.gamma" not in sd and "encoder.downsamples.11.residual.0.gamma" not in sd
    assert len(sd) == 194
    assert sum(v.numel() for v in sd.values()) == 126_892_531  # ≈126.9 M (reference notes)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_decode_frame_counts(vae, k):
    frames = vae.decode(torch.randn(1, 16, k, 2, 3))
    assert frames.shape == (1 + 4 * (k - 1), 16, 24, 3)
    assert frames.dtype == torch.float32 and 0 <= frames.min() and frames.max() <= 1


def test_streaming_decode_equals_whole(vae):
    z = torch.randn(1, 16, 6, 2, 2)
    whole = vae.decode(z)
    with torch.inference_mode():  # the plain causal model: every latent in one pass, fresh cache
        one_pass = vae.decoder(vae.conv2(z), {})[0].clamp(-1, 1).add(1).mul(0.5).permute(1, 2, 3, 0)
    torch.testing.assert_close(whole, one_pass, atol=1e-5, rtol=1e-5)
    s = vae.stream()
    pieces = [s.decode(z[:, :, i:i + 1]) for i in range(6)]
    assert [p.shape[0] for p in pieces] == [1, 4, 4, 4, 4, 4]
    torch.testing.assert_close(torch.cat(pieces), whole, atol=1e-5, rtol=1e-5)
    s = vae.stream(latents_per_step=3)  # several latents per pass, uneven calls
    torch.testing.assert_close(torch.cat([s(z[:, :, :2]), s(z[:, :, 2:5]), s(z[:, :, 5:])]), whole,
                               atol=1e-5, rtol=1e-5)
    s.reset()
    assert s(z[:, :, :1]).shape[0] == 1


def test_encode_shapes_and_streaming_equals_one_pass(vae):
    torch.manual_seed(1)
    px = torch.rand(9, 16, 24, 3)
    mu = vae.encode(px)
    assert mu.shape == (1, 16, 3, 2, 3)
    assert vae.encode(px[:1]).shape == (1, 16, 1, 2, 3)
    assert vae.encode(torch.rand(12, 16, 24, 3)).shape == (1, 16, 3, 2, 3)  # trailing 3 frames dropped
    with torch.inference_mode():
        one_pass = vae.conv1(vae.encoder(px.permute(3, 0, 1, 2)[None] * 2 - 1, {}))[:, :16]
    torch.testing.assert_close(mu, one_pass, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vae.encode((px * 255).round().to(torch.uint8)),
                               vae.encode((px * 255).round() / 255), atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="multiples of 8"):
        vae.encode(torch.rand(1, 12, 24, 3))


def test_codec_is_model_space(vae):
    codec = WanVAECodec(vae)
    px = torch.rand(5, 16, 16, 3)
    torch.testing.assert_close(codec.encode(px), wan_to_model_space(vae.encode(px)))
    z = torch.randn(1, 16, 2, 2, 2)
    torch.testing.assert_close(codec.decode(z), vae.decode(wan_to_raw(z)))
    torch.testing.assert_close(codec.stream_decoder()(z), codec.decode(z))


@pytest.mark.parametrize("prefix,ext", [("", "safetensors"), ("vae.", "safetensors"), ("", "pth")])
def test_load_layouts(vae, tmp_path, prefix, ext):
    sd = {prefix + k: v.clone() for k, v in vae.state_dict().items()}
    if prefix:  # an all-in-one file: the DiT's keys sit next to the VAE's
        sd["model.diffusion_model.head.modulation"] = torch.zeros(1, 2, 4)
    path = tmp_path / f"vae.{ext}"
    save_file(sd, str(path)) if ext == "safetensors" else torch.save(sd, path)
    loaded = load_wan_vae(path)
    assert loaded.conv2.weight.dtype == torch.float32 and not loaded.conv2.weight.requires_grad
    z = torch.randn(1, 16, 2, 2, 2)
    torch.testing.assert_close(loaded.decode(z), vae.decode(z))
    half = load_wan_vae(path, dtype="bf16")
    assert half.conv2.weight.dtype == torch.bfloat16 and half.decode(z).dtype == torch.float32


def test_bad_keys_explained(vae, tmp_path):
    sd = {k: v.clone() for k, v in vae.state_dict().items()}
    del sd["decoder.head.2.weight"]
    sd["decoder.extra.weight"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError, match=r"broken\.safetensors.*1 missing.*decoder\.head\.2\.weight.*"
                                              r"1 unexpected.*decoder\.extra\.weight"):
        load_wan_vae(tmp_path / "broken.safetensors")
    save_file({"patch_embedding.weight": torch.zeros(2)}, str(tmp_path / "dit.safetensors"))
    with pytest.raises(CheckpointError, match=r"dit\.safetensors: not a Wan2.1 VAE"):
        load_wan_vae(tmp_path / "dit.safetensors")
    sd = {k: v.clone() for k, v in vae.state_dict().items()}
    sd["decoder.head.2.weight"] = torch.zeros(3, 8, 1, 3, 3)
    save_file(sd, str(tmp_path / "shape.safetensors"))
    with pytest.raises(CheckpointError, match=r"shape\.safetensors.*wrong shapes: decoder\.head\.2\.weight"):
        load_wan_vae(tmp_path / "shape.safetensors")


def test_stream_to_mp4_and_cancel_leaves_nothing(vae, tmp_path):
    z = torch.randn(1, 16, 5, 2, 2)
    codec = WanVAECodec(vae)
    seen = []
    out = stream_decode_to_video(z, codec, tmp_path / "a.mp4", fps=16, chunk_latents=2,
                                 on_progress=lambda d, t: seen.append((d, t)))
    assert out == tmp_path / "a.mp4" and read_video(out).shape == (17, 16, 16, 3)
    assert seen == [(2, 5), (4, 5), (5, 5)]

    cancel_dir = tmp_path / "cancel"
    cancel_dir.mkdir()

    class Cancelled(Exception):  # what a host's cancel raises (ComfyUI: InterruptProcessingException)
        pass

    def cancel(done, total):
        if done >= 2:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        stream_decode_to_video(z, codec, cancel_dir / "b.mp4", chunk_latents=1, on_progress=cancel)
    assert os.listdir(cancel_dir) == []
    with pytest.raises(InputError, match="explicit"):
        stream_decode_to_video(z, vae, cancel_dir / "c.mp4")
    assert os.listdir(cancel_dir) == []


class RecordingWriter(VideoWriter):
    batches: list[int] = []
    frames: list[torch.Tensor] = []

    def write(self, frames):
        RecordingWriter.batches.append(int(frames.shape[0]))
        RecordingWriter.frames.append(torch.as_tensor(frames).clone())
        super().write(frames)


def test_long_video_holds_one_chunk_at_a_time(vae, tmp_path, monkeypatch):
    monkeypatch.setattr(ds, "VideoWriter", RecordingWriter)
    RecordingWriter.batches, RecordingWriter.frames = [], []
    torch.manual_seed(2)
    z = torch.randn(1, 16, 40, 2, 2)
    calls = []
    stream = wan_stream_decoder(vae)

    def dec(chunk):
        calls.append(chunk.shape[2])
        return stream(chunk)

    stream_decode_to_video(z, dec, tmp_path / "long.webm", fmt="video/webm", fps=16, chunk_latents=4)
    assert max(calls) == 4 and sum(calls) == 40
    assert max(RecordingWriter.batches) == 16 and sum(RecordingWriter.batches) == 1 + 4 * 39
    assert read_video(tmp_path / "long.webm").shape[0] == 157
    # chunk by chunk equals the whole decode; an iterator of chunks works the same
    whole = WanVAECodec(vae).decode(z)
    torch.testing.assert_close(torch.cat(RecordingWriter.frames), whole, atol=1e-5, rtol=1e-5)
    RecordingWriter.frames = []
    stream_decode_to_video((z[:, :, a:a + 7] for a in range(0, 40, 7)), WanVAECodec(vae), tmp_path / "it.mp4")
    torch.testing.assert_close(torch.cat(RecordingWriter.frames), whole, atol=1e-5, rtol=1e-5)


def test_framewise_codec_chunks_exact(tmp_path, monkeypatch):
    monkeypatch.setattr(ds, "VideoWriter", RecordingWriter)
    RecordingWriter.batches, RecordingWriter.frames = [], []
    codec = DemoCodec()
    z = codec.encode(torch.rand(10, 64, 64, 3))
    stream_decode_to_video(z, codec, tmp_path / "demo.gif", fmt="image/gif", fps=8, chunk_latents=3)
    assert RecordingWriter.batches == [3, 3, 3, 1]
    torch.testing.assert_close(torch.cat(RecordingWriter.frames), codec.decode(z))
    assert read_video(tmp_path / "demo.gif").shape[0] == 10
    with pytest.raises(InputError, match="temporal stride 4"):
        framewise_decoder(WanVAECodec(tiny_vae()))
