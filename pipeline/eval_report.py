"""Aggregation and report writing for the evaluation stage.

``aggregate(results)`` turns the raw per-sample results of ``pipeline.stage_eval`` into the report
dict (per-checkpoint means, pairwise win rates with bootstrap CIs, reward/gold-vs-KL curves, best
and worst examples). ``write_reports(report, results, out_dir)`` writes ``report.json``,
``report.md`` and a self-contained ``report.html`` (inline CSS, plots as base64 PNGs, no scripts,
no external URLs). ``summary_table(report)`` is a fixed-width text table for the console.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
from pathlib import Path

import numpy as np

from pipeline.metrics import load_metric

PAIRS = {"ppo_vs_sft": ("ppo", "sft"), "sft_vs_base": ("sft", "base")}
CURVE_KINDS = ("sft", "ppo_checkpoint", "ppo")
N_EXAMPLES = 3


# ----------------------------------------------------------------------------------------- aggregate
def _clean(x):
    """JSON-safe copy: NaN/inf -> None, numpy scalars -> Python, tuples -> lists."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def _floats(xs) -> np.ndarray:
    return np.asarray([np.nan if v is None else float(v) for v in xs], dtype=np.float64)


def _mean(xs) -> float | None:
    """Mean over the finite values (None/NaN entries, e.g. failed judge calls, are skipped)."""
    if xs is None:
        return None
    a = _floats(xs)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else None


def _block_stats(block: dict, has_gold: bool, distinct, with_kl: bool) -> dict:
    responses = list(block.get("responses") or [])
    out = {
        "reward_mean": _mean(block.get("reward")),
        "gold_score": _mean(block.get("gold")) if has_gold else None,
    }
    if with_kl:
        out["kl_to_sft"] = _mean(block.get("kl_to_sft"))
    eos = block.get("eos")
    out.update(
        {
            "response_length_mean": _mean(block.get("length")),
            "eos_rate": _mean([float(bool(e)) for e in eos]) if eos is not None else None,
            "distinct_2": distinct.compute(predictions=[r or "" for r in responses], n=2)["distinct_n"],
            "num_prompts": len(responses),
        }
    )
    return out


def reward_gold_agreement(reward_a, reward_b, gold_a, gold_b) -> tuple[np.ndarray, int]:
    """Per prompt where the gold judge prefers one response of a pair (a's or b's, same prompt), whether the
    reward model prefers the same one: ``(agreement [n] in {0, 0.5, 1} (a reward tie is 0.5), n)``. The reward
    model's accuracy on the policies' own samples, which held-out pairs from the training distribution do not
    show."""
    ra, rb, ga, gb = (_floats(x) for x in (reward_a, reward_b, gold_a, gold_b))
    decided = np.isfinite(ra) & np.isfinite(rb) & np.isfinite(ga) & np.isfinite(gb) & (ga != gb)
    ra, rb, ga, gb = ra[decided], rb[decided], ga[decided], gb[decided]
    agree = np.where(ra == rb, 0.5, (np.sign(ra - rb) == np.sign(ga - gb)).astype(float))
    return agree, int(decided.sum())


def _pairwise(a: dict, b: dict, has_gold: bool, win, n_boot: int, seed: int) -> dict:
    """Per-prompt win rate of block ``a`` over block ``b`` (same prompt index), ties 0.5, bootstrap CI."""
    n = len(a["responses"])
    if len(b["responses"]) != n:
        raise ValueError(f"pairwise comparison over different prompt counts: {n} vs {len(b['responses'])}")
    out: dict = {"num_prompts": n}
    fields = [("reward", "reward")] + ([("gold", "gold")] if has_gold else [])
    for key, field in fields:
        if a.get(field) is None or b.get(field) is None:
            continue
        sa, sb = _floats(a[field]), _floats(b[field])
        ok = np.isfinite(sa) & np.isfinite(sb)  # drop prompts where either score is missing
        r = win.compute(scores_a=sa[ok].tolist(), scores_b=sb[ok].tolist(), n_boot=n_boot, seed=seed)
        out[f"win_rate_{key}"] = r["win_rate"]
        out[f"win_rate_{key}_ci95"] = [r["ci_low"], r["ci_high"]] if r["ci_low"] is not None else None
        out[f"{key}_wins_ties_losses"] = [r["wins"], r["ties"], r["losses"]]
        if int(ok.sum()) != n:
            out[f"{key}_num_prompts"] = int(ok.sum())
    for key in ("reward", "gold"):
        out.setdefault(f"win_rate_{key}", None)
        out.setdefault(f"win_rate_{key}_ci95", None)
    out["reward_gold_agreement"], out["reward_gold_agreement_ci95"], out["gold_decided"] = None, None, None
    if has_gold and all(x.get(k) is not None for x in (a, b) for k in ("reward", "gold")):
        agree, n_decided = reward_gold_agreement(a["reward"], b["reward"], a["gold"], b["gold"])
        out["gold_decided"] = n_decided
        if n_decided:
            out["reward_gold_agreement"] = float(agree.mean())
            if n_boot > 0:  # over the prompts the judge decides (their number taken as fixed)
                from pipeline.metrics.win_rate.win_rate import bootstrap_ci

                out["reward_gold_agreement_ci95"] = list(bootstrap_ci(agree, n_boot, seed))
    return out


def _examples(results: dict, has_gold: bool) -> dict:
    cks = results["checkpoints"]
    if "ppo" not in cks or "sft" not in cks:
        return {"best": [], "worst": [], "ranked_by": None}
    sft, ppo = cks["sft"]["sampled"], cks["ppo"]["sampled"]
    by = "gold" if has_gold and sft.get("gold") is not None and ppo.get("gold") is not None else "reward"
    delta = _floats(ppo[by]) - _floats(sft[by])
    idx = np.flatnonzero(np.isfinite(delta))
    order = idx[np.argsort(-delta[idx], kind="stable")]
    best = [int(i) for i in order[:N_EXAMPLES]]
    worst = [int(i) for i in order[::-1] if int(i) not in best][:N_EXAMPLES]
    prompts = results.get("prompts") or [""] * len(delta)

    def one(i: int) -> dict:
        gold_s = sft.get("gold") if has_gold else None
        gold_p = ppo.get("gold") if has_gold else None
        return {
            "index": i,
            "prompt": prompts[i],
            "sft": sft["responses"][i],
            "ppo": ppo["responses"][i],
            "sft_gold": None if gold_s is None else gold_s[i],
            "ppo_gold": None if gold_p is None else gold_p[i],
            "sft_reward": sft["reward"][i],
            "ppo_reward": ppo["reward"][i],
            "delta": float(delta[i]),
        }

    return {"best": [one(i) for i in best], "worst": [one(i) for i in worst], "ranked_by": by}


def _iteration_key(item):
    it = item.get("iteration")
    return (math.inf if it is None else it, item.get("_order", 0))


PICK_RULE = (
    "the highest reward-model score on the held-out prompts among SFT and the PPO checkpoints whose KL to SFT is "
    "at most the budget; the gold judge is not consulted"
)


def recommend(curves: list[dict], kl_budget: float | None) -> dict:
    """The checkpoint to ship, chosen without the gold judge: among SFT and the PPO checkpoints within the KL
    budget (nats), the highest mean reward-model score on the held-out prompts. Reward models are over-optimised
    past some KL (Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization"), so the budget caps how far
    the proxy is trusted. Its gold score is reported beside it, never used."""
    out = {"name": None, "rule": PICK_RULE, "kl_budget": kl_budget}
    if kl_budget is None:
        return out
    ok = [c for c in curves if c["kl_to_sft"] is not None and c["reward_mean"] is not None]
    within = [c for c in ok if c["kind"] == "sft" or c["kl_to_sft"] <= kl_budget]
    if not within:
        return out
    best = max(within, key=lambda c: c["reward_mean"])
    keys = ("name", "kind", "iteration", "kl_to_sft", "reward_mean", "gold_score", "gold_rephrased")
    return {**out, **{k: best.get(k) for k in keys}}


def aggregate(results: dict, n_boot: int = 1000, seed: int = 0, kl_budget: float | None = None) -> dict:
    """The report dict (see module docstring) from the raw results of the eval stage; ``kl_budget`` (nats)
    enables the checkpoint recommendation (:func:`recommend`)."""
    has_gold = bool(results.get("has_gold"))
    distinct, win = load_metric("distinct_n"), load_metric("win_rate")
    cks = results["checkpoints"]

    sampled, greedy = {}, {}
    for name, ck in cks.items():
        meta = {"iteration": ck.get("iteration"), "kind": ck.get("kind")}
        sampled[name] = {**_block_stats(ck["sampled"], has_gold, distinct, with_kl=True), **meta}
        sampled[name]["gold_rephrased"] = _mean((ck.get("rephrased") or {}).get("gold")) if has_gold else None
        if ck.get("greedy") is not None:
            greedy[name] = {**_block_stats(ck["greedy"], has_gold, distinct, with_kl=False), **meta}

    pairwise = {}
    for pair, (a, b) in PAIRS.items():
        if a in cks and b in cks:
            pairwise[pair] = _pairwise(cks[a]["sampled"], cks[b]["sampled"], has_gold, win, n_boot, seed)

    curves = []
    for order, (name, ck) in enumerate(cks.items()):
        kind = ck.get("kind", name)
        if kind not in CURVE_KINDS:
            continue
        it = 0 if kind == "sft" else ck.get("iteration")
        s = sampled[name]
        curves.append(
            {
                "name": name,
                "kind": kind,
                "iteration": it,
                "kl_to_sft": s["kl_to_sft"],
                "reward_mean": s["reward_mean"],
                "gold_score": s["gold_score"],
                "gold_rephrased": s["gold_rephrased"],
                "_order": order,
            }
        )
    curves.sort(key=_iteration_key)
    for c in curves:
        del c["_order"]

    report = {
        "checkpoints": sampled,
        "checkpoints_greedy": greedy,
        "pairwise": pairwise,
        "curves": curves,
        "recommended": recommend(curves, kl_budget),
        "examples": _examples(results, has_gold),
        "has_gold": has_gold,
        "num_prompts": len(results.get("prompts") or []),
        "bootstrap": {"n_boot": n_boot, "seed": seed, "ci": 0.95, "decoding": "sampled"},
        "config": results.get("config", {}),
    }
    return _clean(report)


# ------------------------------------------------------------------------------------------ format
def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _fmt_ci(ci) -> str:
    return "n/a" if not ci or ci[0] is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


SUMMARY_COLS = [  # (key, header)
    ("reward_mean", "reward"),
    ("gold_score", "gold"),
    ("gold_rephrased", "gold, held-out phrasing"),
    ("kl_to_sft", "KL to SFT"),
    ("response_length_mean", "length"),
    ("eos_rate", "EOS rate"),
    ("distinct_2", "distinct-2"),
    ("num_prompts", "N"),
]
ONE_DECIMAL = {"response_length_mean"}
PAIR_TITLES = {"ppo_vs_sft": "PPO vs SFT", "sft_vs_base": "SFT vs base"}


def summary_table(report: dict) -> str:
    """Fixed-width text table of base/sft/ppo metrics and the PPO-vs-SFT win rates."""
    cks = report.get("checkpoints", {})
    names = [n for n in ("base", "sft", "ppo") if n in cks]
    header = ["checkpoint"] + [h for _, h in SUMMARY_COLS]
    rows = [[n] + [_fmt(cks[n].get(k), 1 if k in ONE_DECIMAL else 3) for k, _ in SUMMARY_COLS] for n in names]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
    pw = report.get("pairwise", {}).get("ppo_vs_sft")
    if pw:
        out.append("")
        out.append(f"PPO vs SFT win rate over {pw['num_prompts']} prompts (sampled, ties = 0.5, 95% bootstrap CI):")
        out.append(f"  reward model  {_fmt(pw.get('win_rate_reward'))}  {_fmt_ci(pw.get('win_rate_reward_ci95'))}")
        out.append(f"  gold judge    {_fmt(pw.get('win_rate_gold'))}  {_fmt_ci(pw.get('win_rate_gold_ci95'))}")
    else:
        out.append("")
        out.append("PPO vs SFT: no PPO checkpoint evaluated")
    out += ["", recommendation_line(report)]
    return "\n".join(out)


def recommendation_line(report: dict) -> str:
    rec = report.get("recommended") or {}
    if not rec.get("name"):
        return "Recommended checkpoint: none (no KL budget, or no SFT or PPO checkpoint was evaluated)"
    line = (
        f"Recommended checkpoint: {rec['name']} (KL {_fmt(rec['kl_to_sft'], 2)} <= {_fmt(rec['kl_budget'], 2)}, "
        f"reward {_fmt(rec['reward_mean'])}; chosen without the gold judge)"
    )
    if rec.get("gold_score") is not None:
        line += f"; its gold score: {_fmt(rec['gold_score'])}"
    return line


# -------------------------------------------------------------------------------------------- plots
def _png_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _short(name: str) -> str:
    """Axis label: "ppo-iter-000010" -> "it 10"."""
    return re.sub(r"^ppo-iter-0*(\d)", r"it \1", name)


def plot_score_distributions(report: dict, results: dict) -> str:
    """Box plots of per-sample reward (and gold, when present) per checkpoint, sampled decoding."""
    from matplotlib.figure import Figure

    names = list(results["checkpoints"])
    panels = [("reward", "reward-model score")]
    if report.get("has_gold"):
        panels.append(("gold", "gold score"))
    fig = Figure(figsize=(5.2 * len(panels), 4.2))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (field, title) in zip(axes, panels):
        data, labels = [], []
        for n in names:
            vals = results["checkpoints"][n]["sampled"].get(field)
            if vals is None:
                continue
            a = _floats(vals)
            data.append(a[np.isfinite(a)])
            labels.append(_short(n))
        if data:
            ax.boxplot(data, showmeans=True, meanprops={"marker": "D", "markerfacecolor": "white"})
            ax.set_xticks(range(1, len(labels) + 1), labels, rotation=30, ha="right")
        ax.set_title(f"{title} per checkpoint (sampled)")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png_data_uri(fig)


def plot_curves(report: dict) -> str:
    """Reward-model score and gold score against KL to SFT over sft -> PPO checkpoints -> ppo."""
    from matplotlib.figure import Figure

    pts = [c for c in report.get("curves", []) if c.get("kl_to_sft") is not None]
    fig = Figure(figsize=(8, 4.6))
    ax = fig.subplots()
    ax.set_xlabel("KL to SFT (nats per response, mean)")
    ax.grid(alpha=0.3)
    if not pts:
        ax.text(0.5, 0.5, "no SFT/PPO checkpoints with KL", ha="center", va="center", transform=ax.transAxes)
        return _png_data_uri(fig)
    kl = [c["kl_to_sft"] for c in pts]
    labels = [
        "sft" if c["kind"] == "sft" else (f"it {c['iteration']}" if c["iteration"] is not None else c["name"])
        for c in pts
    ]
    handles = []
    rw = [np.nan if c["reward_mean"] is None else c["reward_mean"] for c in pts]
    handles += ax.plot(kl, rw, "o-", color="tab:blue", label="reward model (left)")
    ax.set_ylabel("reward-model score", color="tab:blue")
    ax.tick_params(axis="y", labelcolor="tab:blue")
    for x, y, lab in zip(kl, rw, labels):
        ax.annotate(lab, (x, y), textcoords="offset points", xytext=(4, 6), fontsize=8, color="tab:blue")
    pick = (report.get("recommended") or {}).get("name")
    for c, x, y in zip(pts, kl, rw):
        if c["name"] == pick:
            handles += ax.plot([x], [y], "*", markersize=16, color="tab:green", label="recommended (no gold)")
    budget = (report.get("recommended") or {}).get("kl_budget")
    if budget is not None:
        ax.axvline(budget, color="grey", linestyle=":", linewidth=1)
    if report.get("has_gold") and any(c["gold_score"] is not None for c in pts):
        ax2 = ax.twinx()
        gd = [np.nan if c["gold_score"] is None else c["gold_score"] for c in pts]
        handles += ax2.plot(kl, gd, "s--", color="tab:orange", label="gold judge (right)")
        ax2.set_ylabel("gold score", color="tab:orange")
        ax2.tick_params(axis="y", labelcolor="tab:orange")
        for x, y, lab in zip(kl, gd, labels):
            ax2.annotate(lab, (x, y), textcoords="offset points", xytext=(4, -12), fontsize=8, color="tab:orange")
        ax.set_title("Reward and gold vs KL to SFT (reward rising while gold falls = over-optimisation)", fontsize=10)
    else:
        ax.set_title("Reward vs KL to SFT (no gold judge for this task)", fontsize=10)
    ax.margins(x=0.08, y=0.15)
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    return _png_data_uri(fig)


def plot_length_eos(report: dict) -> str:
    """Mean response length and EOS rate per checkpoint, sampled and greedy side by side."""
    from matplotlib.figure import Figure

    names = list(report["checkpoints"])
    greedy = report.get("checkpoints_greedy", {})
    fig = Figure(figsize=(11, 3.8))
    axes = fig.subplots(1, 2)
    x = np.arange(len(names))
    for ax, (key, title) in zip(
        axes,
        [
            ("response_length_mean", "mean response length (tokens)"),
            ("eos_rate", "EOS rate (ended before max length)"),
        ],
    ):
        s = [np.nan if report["checkpoints"][n].get(key) is None else report["checkpoints"][n][key] for n in names]
        g = [np.nan if greedy.get(n, {}).get(key) is None else greedy[n][key] for n in names]
        ax.bar(x - 0.2, s, width=0.4, label="sampled", color="tab:blue")
        if greedy:
            ax.bar(x + 0.2, g, width=0.4, label="greedy", color="tab:gray")
        ax.set_xticks(x, [_short(n) for n in names], rotation=30, ha="right")
        ax.set_title(title)
        if key == "eos_rate":
            ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
        if key == "response_length_mean":  # one legend, where the short PPO bars leave room
            ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return _png_data_uri(fig)


# ---------------------------------------------------------------------------------------- markdown
def _md_cell(x) -> str:
    s = x if isinstance(x, str) else _fmt(x)
    return html.escape(s, quote=False).replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def _md_table(header: list[str], rows: list[list]) -> str:
    lines = [
        "| " + " | ".join(_md_cell(h) for h in header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _checkpoint_rows(cks: dict, cols) -> list[list]:
    def cell(d, k):
        v = d.get(k)
        return _fmt(v, 1) if k in ONE_DECIMAL and v is not None else v

    return [[n, cks[n].get("kind"), cks[n].get("iteration")] + [cell(cks[n], k) for k, _ in cols] for n in cks]


def _pair_rows(report: dict) -> list[list]:
    rows = []
    for pair, pw in report.get("pairwise", {}).items():
        rows.append(
            [
                PAIR_TITLES.get(pair, pair),
                pw.get("win_rate_reward"),
                _fmt_ci(pw.get("win_rate_reward_ci95")),
                pw.get("win_rate_gold"),
                _fmt_ci(pw.get("win_rate_gold_ci95")),
                pw.get("reward_gold_agreement"),
                _fmt_ci(pw.get("reward_gold_agreement_ci95")),
                pw.get("gold_decided"),
                pw.get("num_prompts"),
            ]
        )
    return rows


PAIR_HEADER = ["comparison", "win rate (reward)", "95% CI", "win rate (gold)", "95% CI",
               "reward agrees with gold", "95% CI", "prompts gold decides", "prompts"]  # fmt: skip
CURVE_HEADER = ["checkpoint", "iteration", "KL to SFT", "reward", "gold", "gold, held-out phrasing"]


def _curve_rows(report: dict) -> list[list]:
    pick = (report.get("recommended") or {}).get("name")
    return [
        [c["name"] + (" (recommended)" if c["name"] == pick else ""), c["iteration"], c["kl_to_sft"], c["reward_mean"],
         c["gold_score"], c.get("gold_rephrased")]
        for c in report["curves"]
    ]  # fmt: skip


def _example_title(report: dict) -> str:
    by = report.get("examples", {}).get("ranked_by")
    return f"ranked by PPO - SFT {by} score on the same prompt (sampled responses)" if by else ""


def render_markdown(report: dict) -> str:
    greedy_cols = [c for c in SUMMARY_COLS if c[0] != "kl_to_sft"]
    out = ["# RLHF evaluation report", ""]
    if not report.get("has_gold"):
        out += ["_No gold judge for this task: gold scores and gold win rates are n/a._", ""]
    out += [
        "## Summary",
        "",
        "Sampled decoding, means over held-out prompts.",
        "",
        _md_table(
            ["checkpoint", "kind", "iteration"] + [h for _, h in SUMMARY_COLS],
            _checkpoint_rows(report["checkpoints"], SUMMARY_COLS),
        ),
        "",
    ]
    out += ["### Greedy decoding", ""]
    out += [
        _md_table(
            ["checkpoint", "kind", "iteration"] + [h for _, h in greedy_cols],
            _checkpoint_rows(report.get("checkpoints_greedy", {}), greedy_cols),
        )
        if report.get("checkpoints_greedy")
        else "No greedy results.",
        "",
    ]
    out += [
        "## PPO vs SFT",
        "",
        "Per-prompt win rates (same prompt, sampled responses, ties count 0.5), "
        "percentile bootstrap 95% CI over prompts. 'Reward agrees with gold': on the prompts where the gold "
        "judge prefers one of the two responses, how often the reward model prefers the same one (its interval "
        "resamples those prompts).",
        "",
    ]
    if "ppo_vs_sft" not in report.get("pairwise", {}):
        out += ["No PPO checkpoint was evaluated.", ""]
    out += [_md_table(PAIR_HEADER, _pair_rows(report)) if report.get("pairwise") else "", ""]
    out += ["## Reward and gold vs KL", "", _md_table(CURVE_HEADER, _curve_rows(report)), ""]
    out += [recommendation_line(report) + f". Rule: {PICK_RULE}.", ""]
    out += ["## Examples", "", _example_title(report), ""]
    for key, title in (("best", "PPO gained most"), ("worst", "PPO lost most")):
        exs = report.get("examples", {}).get(key, [])
        out += [f"### {title}", ""]
        if not exs:
            out += ["No examples.", ""]
            continue
        out += [
            _md_table(
                ["#", "prompt", "SFT", "PPO", "gold SFT -> PPO", "reward SFT -> PPO"],
                [
                    [
                        e["index"],
                        e["prompt"],
                        e["sft"],
                        e["ppo"],
                        f"{_fmt(e['sft_gold'], 2)} -> {_fmt(e['ppo_gold'], 2)}",
                        f"{_fmt(e['sft_reward'])} -> {_fmt(e['ppo_reward'])}",
                    ]
                    for e in exs
                ],
            ),
            "",
        ]
    out += ["## Config", "", "```json", json.dumps(report.get("config", {}), indent=2, default=str), "```", ""]
    return "\n".join(out)


# -------------------------------------------------------------------------------------------- html
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:24px auto;max-width:1200px;
 padding:0 16px;color:#1b1f24;background:#fff;line-height:1.4}
h1{font-size:1.6em;border-bottom:2px solid #d0d7de;padding-bottom:6px}
h2{font-size:1.3em;margin-top:32px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
h3{font-size:1.05em;margin-top:20px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:.92em}
th,td{border:1px solid #d0d7de;padding:4px 10px;text-align:right}
th{background:#f3f5f7}
td:first-child,th:first-child,td.t{text-align:left}
tr.hl td{background:#fff8e1}
.note{color:#57606a;font-size:.9em}
img.plot{max-width:100%;display:block;margin:8px 0 16px;border:1px solid #eaeef2}
.ex{border:1px solid #d0d7de;border-radius:6px;margin:12px 0;padding:10px}
.ex .prompt{font-weight:600;white-space:pre-wrap;margin-bottom:8px}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:10px}
.pair>div{background:#f6f8fa;border-radius:4px;padding:8px;overflow-wrap:anywhere}
.pair pre{white-space:pre-wrap;margin:6px 0 0;font-family:inherit}
.score{font-size:.85em;color:#57606a}
details pre{background:#f6f8fa;padding:10px;overflow-x:auto;font-size:.85em}
"""


def _e(x) -> str:
    return html.escape(x if isinstance(x, str) else _fmt(x), quote=True)


def _html_table(header: list[str], rows: list[list], highlight: set[str] = frozenset()) -> str:
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"
    hl = ' class="hl"'

    def td(c):  # text left, numbers (and CIs) right
        left = isinstance(c, str) and c[:1].isalpha() and c != "n/a"
        return f'<td class="t">{_e(c)}</td>' if left else f"<td>{_e(c)}</td>"

    body = "".join(f"<tr{hl if r and r[0] in highlight else ''}>" + "".join(td(c) for c in r) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def _html_examples(exs: list[dict]) -> str:
    if not exs:
        return '<p class="note">No examples.</p>'
    parts = []
    for e in exs:

        def side(label, resp, gold, reward):
            return (
                f'<div><strong>{_e(label)}</strong> <span class="score">gold {_e(_fmt(gold, 2))}, '
                f"reward {_e(_fmt(reward))}</span><pre>{_e(resp)}</pre></div>"
            )

        parts.append(
            f'<div class="ex"><div class="prompt">Prompt #{e["index"]}: {_e(e["prompt"])}</div><div class="pair">'
            + side("SFT", e["sft"], e["sft_gold"], e["sft_reward"])
            + side("PPO", e["ppo"], e["ppo_gold"], e["ppo_reward"])
            + "</div></div>"
        )
    return "".join(parts)


def render_html(report: dict, results: dict) -> str:
    greedy_cols = [c for c in SUMMARY_COLS if c[0] != "kl_to_sft"]
    main_rows = {"base", "sft", "ppo"}
    b = []
    b.append("<h1>RLHF evaluation report</h1>")
    if not report.get("has_gold"):
        b.append('<p class="note">No gold judge for this task: gold scores and gold win rates are n/a.</p>')
    b.append(
        '<h2>Summary</h2><p class="note">Sampled decoding, means over '
        f"{_e(report.get('num_prompts'))} held-out prompts. KL to SFT in nats per response.</p>"
    )
    b.append(
        _html_table(
            ["checkpoint", "kind", "iteration"] + [h for _, h in SUMMARY_COLS],
            _checkpoint_rows(report["checkpoints"], SUMMARY_COLS),
            main_rows,
        )
    )
    b.append("<h3>Greedy decoding</h3>")
    b.append(
        _html_table(
            ["checkpoint", "kind", "iteration"] + [h for _, h in greedy_cols],
            _checkpoint_rows(report["checkpoints_greedy"], greedy_cols),
            main_rows,
        )
        if report.get("checkpoints_greedy")
        else '<p class="note">No greedy results.</p>'
    )
    b.append(
        '<h2>PPO vs SFT</h2><p class="note">Per-prompt win rates on the same prompt (sampled responses, '
        "ties count 0.5) with percentile bootstrap 95% CIs over prompts. 'Reward agrees with gold': on the "
        "prompts where the gold judge prefers one of the two responses, how often the reward model prefers the "
        "same one (its interval resamples those prompts).</p>"
    )
    if "ppo_vs_sft" not in report.get("pairwise", {}):
        b.append('<p class="note">No PPO checkpoint was evaluated.</p>')
    if report.get("pairwise"):
        b.append(_html_table(PAIR_HEADER, _pair_rows(report)))
    b.append("<h2>Reward and gold vs KL</h2>")
    b.append(f'<img class="plot" alt="reward and gold vs KL to SFT" src="{plot_curves(report)}">')
    b.append(_html_table(CURVE_HEADER, _curve_rows(report)))
    b.append(f'<p class="note">{_e(recommendation_line(report))}. Rule: {_e(PICK_RULE)}.</p>')
    b.append("<h2>Score distributions</h2>")
    b.append(
        f'<img class="plot" alt="score distributions per checkpoint" '
        f'src="{plot_score_distributions(report, results)}">'
    )
    b.append("<h2>Response length and EOS</h2>")
    b.append(f'<img class="plot" alt="response length and EOS rate per checkpoint" src="{plot_length_eos(report)}">')
    b.append(f'<h2>Examples</h2><p class="note">{_e(_example_title(report))}</p>')
    b.append("<h3>PPO gained most</h3>" + _html_examples(report.get("examples", {}).get("best", [])))
    b.append("<h3>PPO lost most</h3>" + _html_examples(report.get("examples", {}).get("worst", [])))
    b.append(
        "<h2>Config</h2><details><summary>run configuration (click to expand)</summary><pre>"
        + _e(json.dumps(report.get("config", {}), indent=2, default=str))
        + "</pre></details>"
    )
    # The CSP forbids scripts and any non-inline resource, belt and braces on top of the escaping.
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
        "style-src 'unsafe-inline'\">"
        "<title>RLHF evaluation report</title>"
        f"<style>{CSS}</style></head><body>\n" + "\n".join(b) + "\n</body></html>\n"
    )


# ------------------------------------------------------------------------------------------- write
def _write(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_reports(report: dict, results: dict, out_dir: Path) -> dict[str, Path]:
    """Write report.json, report.md and report.html into ``out_dir``; returns {"json", "md", "html"} -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = _clean(report)
    return {
        "json": _write(out_dir / "report.json", json.dumps(report, indent=2, default=str) + "\n"),
        "md": _write(out_dir / "report.md", render_markdown(report)),
        "html": _write(out_dir / "report.html", render_html(report, results)),
    }
