"""Routing health, MoE FLOPs and plots from real (untrained) models on real batches (in process: fast)."""

from __future__ import annotations

import struct

import pytest
import torch

from audiomoe.analysis.plots import metric_by_config, save_png, training_curves
from audiomoe.analysis.routing_plots import routing_figures
from audiomoe.analysis.routing_stats import measure_model
from audiomoe.analysis.trace import RoutingTrace
from audiomoe.core.composer import compose
from audiomoe.data.synthetic import classification_tasks, tone_batch


def _batches(model, n=2, bs=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    tasks = classification_tasks(model, model.task_names)
    return [tone_batch(tasks, bs, int(model.encoder.sample_rate), generator=g) for _ in range(n)]


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24]), len(data)


@pytest.fixture(scope="module")
def topk():
    model = compose("tiny-moe-cls")
    batches = _batches(model)
    return model, batches, measure_model(model, batches)


def test_top2_routing_counts_and_flops_by_hand(topk):
    model, batches, m = topk
    layers = [n for n, r in m["routing"].items() if r["kind"] == "token"]
    assert layers == ["backbone/layer0", "backbone/layer1"]
    for name in layers:
        r = m["routing"][name]
        assert r["real_experts_per_token"] == pytest.approx(2.0) and r["null_share"] == 0.0  # top-2, no null experts
        assert sum(sum(v) for v in r["load_by_task"].values()) == pytest.approx(2 * r["items"])
        assert set(r["load_by_task"]) == {"emotion", "speaker"} and r["column_labels"] == ["e0", "e1", "e2", "e3"]
    # FLOPs by hand: 2 x (pairs x one expert's params + tokens x router params); top-2 -> pairs = 2 x tokens
    moe = [mod for _, mod in model.named_modules() if type(mod).__name__ == "MoELayer"]
    per_expert = sum(p.numel() for p in moe[0].experts.parameters()) / moe[0].num_experts
    router = sum(p.numel() for p in moe[0].router.parameters())
    tokens = m["routing"]["backbone/layer0"]["items"]
    per_layer = 2 * (2 * tokens * per_expert + tokens * router)
    seconds = sum(float(b.lengths.sum()) / b.sample_rate for b in batches)
    assert m["audio_seconds"] == pytest.approx(seconds)
    assert m["moe_mflops_per_audio_s"] == pytest.approx(2 * per_layer / 1e6 / seconds)
    assert m["params_total"] == sum(p.numel() for p in model.parameters()) and m["params_active"] < m["params_total"]


def test_top_p_null_stats_match_the_routing_trace():
    model = compose("tiny-unimoe")
    batches = _batches(model, n=1)
    m = measure_model(model, batches)
    with torch.no_grad():
        model.eval()
        b = batches[0]
        out = model(type(b)(b.waveforms, b.sample_rate, b.tasks, b.lengths, None))
    ref = RoutingTrace.from_output(out).summary()
    for name in ("backbone/layer0", "backbone/layer1"):
        r = m["routing"][name]
        assert r["null_columns"] == 1 and r["column_labels"][-1] == "null0"
        assert r["real_experts_per_token"] == pytest.approx(ref[name]["real_experts_per_item"])
        assert r["null_share"] == pytest.approx(ref[name]["null_share"])
        assert r["real_experts_per_token"] <= r["experts_per_token"]
    layers = m["moe_layers"]
    assert all(v["pairs"] <= v["tokens"] * 8 for v in layers.values())  # real picks only: at most all 8 routed experts
    heat = routing_figures({"top_p": [m]})["expert_load"].axes[0]
    assert heat.get_xlabel() == "expert (null = computation skipped)"  # a null column: the label says what it is


@pytest.fixture(scope="module")
def mowe():
    model = compose("mowe-tiny")
    return measure_model(model, _batches(model, n=1, bs=6))


def test_mowe_weak_encoder_selection_per_task(mowe):
    m = mowe
    r = m["routing"]["encoder/mowe"]
    assert r["kind"] == "sample" and m["weak_encoders"] == [
        "weak0 whisper",
        "weak1 whisper",
        "weak2 hubert",
        "weak3 hubert",
    ]
    assert r["column_labels"] == m["weak_encoders"]
    for task, shares in r["selection_by_task"].items():  # top-1 router: every sample runs exactly one weak encoder
        assert sum(shares) == pytest.approx(1.0), task
    assert m["moe_mflops_per_audio_s"] is None  # no MoE FFN layer in this model


def test_routing_plots_are_pngs_with_labelled_axes(topk, mowe, tmp_path):
    _, _, m = topk
    figs = routing_figures({"top2": [m, m], "mowe": [mowe]})
    assert set(figs) == {"experts_per_layer", "expert_load", "weak_selection"}  # no null columns: no null-share plot
    ax = figs["experts_per_layer"].axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("MoE layer", "routed experts per token (null excluded)")
    assert ax.get_title().startswith("experts per token per layer")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["top2"]
    heat = figs["expert_load"].axes[0]
    assert (heat.get_xlabel(), heat.get_ylabel()) == ("expert", "task")  # top-2, no null column: no null in the label
    weak = figs["weak_selection"].axes[0]
    assert weak.get_xlabel() == "weak encoder" and [t.get_text() for t in weak.get_yticklabels()] == [
        "emotion",
        "speaker",
    ]
    (w, h), size = _png_size(save_png(figs["experts_per_layer"], tmp_path / "plots" / "epl.png"))
    assert w > 300 and h > 200 and size > 5000
    _png_size(save_png(figs["weak_selection"], tmp_path / "plots" / "weak.png"))


def test_metric_and_curve_plots_read_the_tables(tmp_path):
    agg = [
        {"config": "a", "arm": "x", "acc/mean": 0.5, "acc/ci_low": 0.4, "acc/ci_high": 0.6},
        {"config": "b", "arm": "x", "acc/mean": 0.7, "acc/ci_low": -3.0, "acc/ci_high": 4.0},
    ]
    rows = [
        {"config": "a", "status": "ok", "acc": 0.45},
        {"config": "a", "status": "ok", "acc": 0.55},
        {"config": "b", "status": "ok", "acc": 0.7},
    ]
    fig = metric_by_config(agg, rows, "acc", chance=0.25)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "acc" and ax.get_xlabel() == "config" and "95% CI" in ax.get_title()
    assert ax.get_ylim()[0] >= 0.0 and ax.get_ylim()[1] <= 1.05  # a 2-seed interval does not flatten the bars
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]
    _png_size(save_png(fig, tmp_path / "m.png"))
    fig = training_curves({"a": [([1, 2, 3], [3.0, 2.0, 1.5]), ([1, 2, 3], [3.2, 2.2, 1.4])]})
    ax = fig.axes[0]
    assert ax.get_xlabel() == "optimizer step" and ax.get_ylabel().startswith("training loss")
    mean_line = [ln for ln in ax.get_lines() if ln.get_label() == "a"][0]
    assert list(mean_line.get_ydata()) == pytest.approx([3.1, 2.1, 1.45])


def test_router_top_probability_by_hand_and_the_uniform_flag(topk, tmp_path):
    from audiomoe.analysis.report_blocks import routing_blocks

    model, batches, m = topk
    tops: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        model.eval()
        for b in batches:
            out = model(type(b)(b.waveforms, b.sample_rate, b.tasks, b.lengths, None))
            for name, r in out.routing.items():
                top = torch.softmax(r.logits.float(), -1).amax(-1).reshape(-1)
                tops.setdefault(name, []).append(top[r.item_mask.reshape(-1)] if r.item_mask is not None else top)
    for name, parts in tops.items():
        assert m["routing"][name]["top_prob"] == pytest.approx(float(torch.cat(parts).mean()), rel=1e-5)
        assert m["routing"][name]["uniform_prob"] == pytest.approx(1 / 4)
    flat = {k: {**v, "top_prob": 0.26} for k, v in m["routing"].items()}  # 0.01 above 1/E: near uniform
    blocks = routing_blocks({"sharp": [m], "flat": [{**m, "routing": flat}]}, tmp_path)
    text = " ".join(b[1] for b in blocks if b[0] == "p")
    assert "Near uniform" in text and "backbone/layer0 of flat" in text
    assert ("of sharp" in text) == (min(r["top_prob"] for r in m["routing"].values()) - 0.25 < 0.02)


def test_learning_check_counts_configs_whose_every_seed_left_chance():
    from audiomoe.analysis.report_blocks import learning_check

    agg = [
        {"config": "a", "m/mean": 0.30, "m/ci_low": 0.05},
        {"config": "b", "m/mean": 0.15, "m/ci_low": 0.14},
        {"config": "c", "m/mean": 0.40, "m/ci_low": 0.35},
    ]
    ok = [
        {"config": "a", "m": 0.25},
        {"config": "a", "m": 0.35},
        {"config": "b", "m": 0.14},
        {"config": "b", "m": 0.16},
        {"config": "c", "m": 0.39},
        {"config": "c", "m": 0.41},
    ]
    text = learning_check(agg, ok, "m", chance=0.13, seeds=2)
    assert "2 of 3 configs score at least 0.05 above chance at every seed (a, c)" in text
    assert (
        "2 have their whole 95% interval above chance (with 2 seeds" in text
        and "1 have a mean within 0.05 of chance." in text
    )


def test_held_out_batches_are_the_trainers_eval_batches_with_the_recipes_settings(tmp_path):
    import json

    from audiomoe.analysis.measure import heldout_batches, run_settings
    from audiomoe.train.data import build_data

    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "run.json").write_text(json.dumps({"recipe": {"data": "tones", "seed": 5, "batch_size": 4}}))
    (tmp_path / "train" / "summary.json").write_text(json.dumps({"config": {"data": "builtin", "seed": 1, "steps": 3}}))
    assert run_settings(tmp_path) == {"data": "tones", "seed": 5, "batch_size": 4}  # the recipe the trainer ran wins
    model = compose("tiny-cls")
    held, name = heldout_batches(model, run_settings(tmp_path), 2)
    _, ref = build_data(model, "tones", None, batch_size=4, seed=5, eval_batches=2)
    assert name == "tones" and len(held) == 2
    for a, b in zip(held, ref):
        assert torch.equal(a.waveforms, b.waveforms) and a.targets == b.targets


def test_a_head_writing_through_the_shared_decoder_is_measured_teacher_forced():
    """UniMoE-Audio's codec head routes its sequence inside the backbone's loss pass: the measure sees every layer."""
    from audiomoe.core.batch import AudioBatch

    torch.manual_seed(0)
    model = compose("unimoe-audio-tiny")
    head = model.heads["tts"]
    batch = AudioBatch(
        0.1 * torch.randn(3, 16000),
        16000,
        "tts",
        torch.tensor([16000, 9000, 12000]),
        head.example_targets(3),
        ["hi", "a b", "c"],
    )
    m = measure_model(model, [batch])
    layers = sorted(m["routing"])  # the codec head's pass runs in the shared backbone: reported as its layers
    assert layers == ["backbone/layer0", "backbone/layer1"]
    for name in layers:
        r = m["routing"][name]
        assert r["kind"] == "token" and list(r["load_by_task"]) == ["tts"] and r["null_columns"] == 1
        assert 1.0 <= r["experts_per_token"] <= 9.0 and 0.0 <= r["null_share"] <= 1.0
    # the MoE layers' own counts are of the same teacher-forced pass (no generation ran)
    assert {v["tokens"] for v in m["moe_layers"].values()} == {m["routing"][layers[0]]["items"]}


def test_records_of_part_of_a_batch_are_attributed_to_their_own_items():
    """Text, codec and classification items in one batch: each head's decoder pass, and the backbone pass of the
    classification items, cover only their items; stats and the training log attribute every sample to its task."""
    from audiomoe.core.batch import AudioBatch
    from audiomoe.train.recipe import HealthSpec
    from audiomoe.train.runlog import RoutingMonitor

    torch.manual_seed(0)
    model = compose("mowe-unimoe-tiny", ["tasks.emotion=classification", "tasks.emotion.num_classes=4"]).eval()
    tasks = ["tts", "asr", "emotion", "asr", "tts", "emotion", "tts"]
    targets = [model.heads[t].example_targets(1)[0] for t in tasks]
    batch = AudioBatch(
        0.1 * torch.randn(7, 16000),
        16000,
        tasks,
        None,
        targets,
        [{"text": "hi"} if t == "tts" else None for t in tasks],
    )
    with torch.no_grad():
        out = model(batch, predict=False)
    per_layer = out.routing_tasks(tasks)
    assert per_layer["heads/tts/decoder/layer0"] == ["tts"] * 3 and per_layer["heads/asr/decoder/layer0"] == ["asr"] * 2
    assert per_layer["backbone/layer0"] == ["emotion"] * 2 and out.routing_rows["backbone/layer0"].tolist() == [2, 5]
    m = measure_model(model, [batch])["routing"]
    # every pass through the one LLM is one layer's record, its rows attributed to their tasks
    assert sorted(m) == ["backbone/layer0", "backbone/layer1", "encoder/mowe"]
    valid = lambda r: float(r.mask.shape[0] if r.item_mask is None else r.item_mask.sum())
    for layer in ("layer0", "layer1"):
        r = m[f"backbone/{layer}"]
        assert sorted(r["load_by_task"]) == ["asr", "emotion", "tts"]
        parts = {t: out.routing[f"heads/{t}/decoder/{layer}"] for t in ("asr", "tts")} | {
            "emotion": out.routing[f"backbone/{layer}"]
        }
        assert r["items"] == sum(valid(p) for p in parts.values())
        for t, p in parts.items():  # each task's load row counts that pass's picks per column (routed and null)
            picks = p.mask if p.item_mask is None else p.mask[p.item_mask]
            assert r["load_by_task"][t] == picks.sum(0).tolist(), (layer, t)
    stats, _ = RoutingMonitor(HealthSpec()).report(out.routing, per_layer, model.task_names)
    assert set(stats["heads/tts/decoder/layer0"]["per_task"]) == {"tts"} and set(
        stats["backbone/layer0"]["per_task"]
    ) == {"emotion"}
    shares = stats["heads/asr/decoder/layer0"]["per_task"]["asr"]  # rounded to 4 decimals: off by <= 5e-5 each
    assert sum(shares) == pytest.approx(1.0, abs=5e-5 * len(shares))


def test_a_stored_measurement_is_reused_only_for_its_version_and_checkpoint():
    """A measure.json of an older audiomoe, or of the checkpoint before a resumed run went on, is measured again."""
    from audiomoe.analysis.measure import MEASURE_VERSION, measure_is_current

    summary = {"checkpoint": "runs/a/step-000020"}
    assert measure_is_current({"version": MEASURE_VERSION, "checkpoint": "runs/a/step-000020"}, summary)
    assert not measure_is_current({"version": MEASURE_VERSION, "checkpoint": "runs/a/step-000010"}, summary)
    assert not measure_is_current(
        {"checkpoint": "runs/a/step-000020"}, summary
    )  # before versions: teacher forcing missing
    assert not measure_is_current(None, summary)


def test_mowe_router_top_probability_per_task_by_hand_and_in_the_report(tmp_path):
    """Per task, the mean top router probability of the per-sample (weak-encoder) router equals a direct computation
    over that task's samples; the report shows it against uniform."""
    from audiomoe.analysis.report_blocks import routing_blocks

    model = compose("mowe-tiny")
    batches = _batches(model, n=2, bs=6, seed=3)
    m = measure_model(model, batches)
    rec = m["routing"]["encoder/mowe"]
    want: dict[str, list[float]] = {}
    with torch.no_grad():
        model.eval()
        for b in batches:
            out = model(type(b)(b.waveforms, b.sample_rate, b.tasks, b.lengths, None))
            r = out.routing["encoder/mowe"]
            top = torch.softmax(r.logits.float(), -1).amax(-1).reshape(-1).tolist()
            for t, v in zip(out.routing_tasks(b.task_list())["encoder/mowe"], top):
                want.setdefault(t, []).append(v)
    assert set(rec["top_prob_by_task"]) == set(want) and len(want) >= 2
    for t, vs in want.items():
        assert rec["top_prob_by_task"][t] == pytest.approx(sum(vs) / len(vs), rel=1e-5)
    blocks = routing_blocks({"mowe": [m]}, tmp_path)
    table = next(b for b in blocks if b[0] == "table" and "mean top probability" in b[1])
    assert {row[2] for row in table[2]} == set(want) and all(
        row[4] == "0.250" for row in table[2]
    )  # 4 weak encoders: 1/E
