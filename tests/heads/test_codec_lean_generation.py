"""Issue 28: the codec generation loop decides the delay pattern on the host and reads the device once per step at most.

The loop (``CodecFrames.sample_frames``) must write exactly the codes of its former form (kept here verbatim
as the reference: a frame ``torch.cat`` per step, two host reads per step) whatever the eos timing, the
min / max frames and the sampling; the codec head on the shared LM must write the same codes through the
lean cached step as through transformers' own cached decoder and without a cache, for one item and a
left-padded pair; and a generation's host reads must not grow with its length.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import audiomoe
from audiomoe.heads.codec_frames import CodecFrameParams, CodecFrames
from audiomoe.heads.functional import revert_delay_pattern, sample_logits


class Frames(CodecFrames):
    def __init__(self, **params) -> None:
        super().__init__()
        self._setup_frames(CodecFrameParams(**params), 8)
        self.params = CodecFrameParams(**params)


def reference_sample_frames(self, step, b, device, p, *, temperature, top_k, top_p, max_frames, generator):
    """The loop before issue 28's rework, verbatim but for the parameter defaults."""
    k = len(self.sizes)
    d = torch.tensor(self.delays, device=device)
    frames = torch.full((b, 1, k), self.bos, dtype=torch.long, device=device)
    ends = torch.full((b,), -1, dtype=torch.long, device=device)
    out_frames = []
    for s in range(max_frames + max(self.delays) + 1):
        last = step(frames)
        t = s - d
        if s - self.delays[self.lead] < p.min_frames:
            last[:, self.lead, self.eos] = float("-inf")
        nxt = sample_logits(last.reshape(b * k, -1), temperature, top_k, top_p, generator).view(b, k)
        if s - self.delays[self.lead] >= max_frames:
            nxt[:, self.lead] = self.eos
        nxt = torch.where(t.view(1, k) < 0, torch.full_like(nxt, self.bos), nxt)
        newly = (ends < 0) & (nxt[:, self.lead] == self.eos) & (t[self.lead] >= 0)
        ends = torch.where(newly, t[self.lead].expand(b), ends)
        done = ends >= 0
        rel = t.view(1, k) - ends.view(b, 1)
        nxt = torch.where(done.view(b, 1) & (rel == 0), torch.full_like(nxt, self.eos), nxt)
        nxt = torch.where(done.view(b, 1) & (rel > 0), torch.full_like(nxt, self.pad), nxt)
        out_frames.append(nxt)
        frames = torch.cat([frames, nxt[:, None]], 1)
        if bool(done.all()) and bool((rel >= 0).all()):
            break
    delayed = torch.stack(out_frames, 2)
    lengths = ends.clamp_min(0)
    codes = revert_delay_pattern(delayed, lengths, self.delays, pad=self.pad)
    return [codes[i, :, : int(lengths[i])] for i in range(b)]


def scripted_step(head: Frames, b: int, eos_at: dict[int, int], seen: list, seed: int):
    """Random logits [B, K, V]; row r's lead codebook strongly prefers eos from step ``eos_at[r]`` on."""
    g = torch.Generator().manual_seed(seed)

    def step(frames: torch.Tensor) -> torch.Tensor:
        s = frames.shape[1] - 1
        seen.append(frames.clone())
        logits = torch.randn(b, len(head.sizes), head.vocab, generator=g)
        for r, at in eos_at.items():
            if s >= at:
                logits[r, head.lead, head.eos] = 50.0
        return logits.masked_fill(~head.allowed, float("-inf"))

    return step


@pytest.mark.parametrize(
    "min_frames,max_frames,eos_at,temperature",
    [
        (1, 12, {0: 3, 1: 7, 2: 30}, 0.0),  # rows end at different frames, one by max_frames
        (4, 12, {0: 1, 1: 2, 2: 5}, 0.0),  # eos asked for before min_frames: held back
        (1, 6, {}, 1.0),  # sampled, every row forced to end at max_frames
        (2, 2, {0: 0, 1: 0, 2: 0}, 1.0),  # min = max
        (3, 9, {0: 5, 1: 5, 2: 5}, 1.0),
        (5, 3, {0: 1}, 0.0),  # a max_frames override below min_frames: eos forced, the loop still stops in time
    ],
)
@pytest.mark.parametrize("delays", [[0, 2, 3], [1, 0, 4]])
def test_the_loop_writes_the_codes_of_its_former_form(min_frames, max_frames, eos_at, temperature, delays):
    head = Frames(
        num_codebooks=3, codebook_size=[7, 9, 5], delays=delays, min_frames=min(min_frames, 12), max_frames=12
    )
    kw = {"temperature": temperature, "top_k": 0, "top_p": 1.0, "max_frames": max_frames}
    seen_new, seen_ref = [], []
    new = head.sample_frames(
        scripted_step(head, 3, eos_at, seen_new, 0),
        3,
        "cpu",
        head.params,
        generator=torch.Generator().manual_seed(5),
        **kw,
    )
    ref = reference_sample_frames(
        head, scripted_step(head, 3, eos_at, seen_ref, 0), 3, "cpu", head.params,
        generator=torch.Generator().manual_seed(5), **kw,
    )  # fmt: skip
    assert [c.shape for c in new] == [c.shape for c in ref]
    assert all(torch.equal(a, b) for a, b in zip(new, ref))
    # the decoder saw the same frames at every step (what a no-cache step re-embeds), and as many steps
    assert len(seen_new) == len(seen_ref)
    assert all(torch.equal(a, b) for a, b in zip(seen_new, seen_ref))
    if 0 in eos_at:  # row 0 ends at the first frame its eos is both asked for and allowed (or forced at max_frames)
        lead_delay = delays[head.lead]
        assert new[0].shape[1] == min(max(head.params.min_frames, eos_at[0] - lead_delay), max_frames)


def _codec_model(frames: int, temperature: float, moe: bool = True):
    over = [f"tasks.codec.temperature={temperature}", "tasks.codec.min_frames=2", f"tasks.codec.max_frames={frames}"]
    torch.manual_seed(0)
    return audiomoe.compose("unimoe-audio-tiny", over + ([] if moe else ["backbone.moe=null"])).eval()


def _prefix(model, batch: int):
    wav = 0.1 * torch.randn(batch, 8000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        audio, pad, _, _ = model.adapt(wav, None, 16000)
        if batch > 1:
            pad[1, audio.shape[1] // 2 :] = True  # a shorter clip: its prefix is left-padded
        head = model.heads["tts"]
        return head, head(audio, pad, prompts=["hello there", "hi"][:batch], decoder=model.backbone, task="tts")


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_codec_codes_are_the_same_through_the_lean_step_transformers_cache_and_no_cache(batch, temperature):
    model = _codec_model(24, temperature)
    head, prefix = _prefix(model, batch)
    if batch > 1:
        assert prefix.real[1].sum() < prefix.real[0].sum() and prefix.real[1, 0] == 0
    runs = {}
    for name, lean, cache in (("lean", True, True), ("transformers", False, True), ("no cache", True, False)):
        model.backbone._lean = lean
        runs[name] = head.generate(prefix, use_cache=cache, generator=torch.Generator().manual_seed(3))
    model.backbone._lean = True
    assert all(c.shape == (12, 24) for c in runs["lean"])
    for name in ("transformers", "no cache"):
        assert all(torch.equal(a, b) for a, b in zip(runs["lean"], runs[name])), name


def _host_reads(head, prefix) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        head.generate(prefix)
    return sum(1 for e in prof.events() if e.name in ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero"))


def test_a_cached_codec_step_reads_nothing_on_the_host():
    # a dense LM (no router: its host-side checks are the MoE layer's); min_frames = max_frames, so the loop need not
    # ask whether a clip has ended before the last step: reads are the prefix's and the end's, whatever the length
    reads = {}
    for frames in (4, 20):
        model = _codec_model(frames, 0.0, moe=False)
        head, prefix = _prefix(model, 2)
        head.params.min_frames = frames
        head.generate(prefix)
        reads[frames] = _host_reads(head, prefix)
    assert reads[4] == reads[20], reads
    # measured 14 at both lengths (the prefill's mask checks, the end); the former loop read 2 more per step
    assert reads[20] <= 20, reads
