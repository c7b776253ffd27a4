"""`shipyard verify DIR`: prove a directory serves, by serving it.

1. transformers loads DIR and greedily answers the probe prompts (fp32);
2. vLLM loads DIR in a subprocess and answers the same dialogs through its own
   chat path (`LLM.chat`): the prompt ids it rendered (held to the ids training
   made of the same prompts, image tokens included) and the tokens it
   generated come back;
3. template parity: every dialog recorded at training time (one of each shape
   the data had: multi-turn, reasoning, tools, ...) renders to the same ids
   through DIR's template with default settings, the loss masks the pipeline
   derives are the same, and every supervised assistant turn ends with an id
   generation_config.json treats as EOS (or the served model never stops);
4. everything is compared and reported; the exit code is 0 only if all agree.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import transformers

from shipyard.data.chat import IGNORE_INDEX, eos_token_ids, render_text
from shipyard.data.images import media_of
from shipyard.data.messages import Record, RecordError, text_of
from shipyard.errors import ShipyardError
from shipyard.hf_files import read_probe
from shipyard.models import mtp
from shipyard.peft.adapter_dir import ADAPTER_CONFIG, is_adapter_dir, resolve_base_dir
from shipyard.serving.worker import INSTALL_HINT, run_jobs, vllm_available
from shipyard.verify import drafter, speculative
from shipyard.models.greedy import greedy, load_for_verify, prompt_inputs
from shipyard.verify.inputs import directory_encoder, model_len_for, served_dialog
from shipyard.export.probe import BUILTIN_DIALOG, BUILTIN_PROMPTS, render_for_probe

# Seconds a vLLM worker process may take for its jobs: a vLLM engine that fails can hang instead of raising.
VLLM_TIMEOUT_S = 900
# Largest |logprob(transformers) - logprob(vLLM)| of a chosen token accepted for the dtype vLLM ran in. Two
# engines computing the same function in fp32 agree to ~1e-5 (reduction order); a different function (a dropped
# soft-cap, another rope scaling) shows as 1e-2 and more even when the greedy tokens still agree.
LOGPROB_TOLERANCE = {"float32": 1e-3, "float16": 5e-2, "bfloat16": 1e-1}


def _show(tokenizer, ids: list[int], at: int, width: int = 6) -> str:
    return repr(tokenizer.decode(ids[max(0, at - width) : at + width]))


def first_difference(a: list, b: list) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def eos_ids_of(directory: Path, tokenizer) -> list[int]:
    path = directory / "generation_config.json"
    eos = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
    eos = tokenizer.eos_token_id if eos is None else eos
    return [eos] if isinstance(eos, int) else list(eos or [])


def recorded_dialogs(probe: dict | None) -> list[dict]:
    """The training-time renderings in a probe (format 1 held one dialog, format 2 one of every shape)."""
    if not probe:
        return []
    if "dialogs" in probe:
        return probe["dialogs"]
    old = probe.get("training_render")
    return [{"source": "probe", "shape": [], "messages": old["messages"], "tools": None, "chat_template_kwargs": {},
             "samples": [{"input_ids": old["input_ids"], "labels": old["labels"]}]}] if old else []


def _turn_ends(labels: list[int]) -> list[int]:
    return [labels[i] for i in range(len(labels))
            if labels[i] != IGNORE_INDEX and (i + 1 == len(labels) or labels[i + 1] == IGNORE_INDEX)]


def _compare_dialog(tokenizer, dialog: dict, multi_turn: str, stops: list[int], encoder=None
                    ) -> tuple[list[str], list[list[int]]]:
    """Problems rendering one recorded dialog with DIR's template, and the label lists it produced."""
    name = f"dialog {dialog['source']}" + (f" ({', '.join(dialog['shape'])})" if dialog.get("shape") else "")
    record = Record(dialog["messages"], dialog["source"], dialog.get("tools"), dialog.get("chat_template_kwargs") or {})
    try:
        served = render_for_probe(tokenizer, record, multi_turn, stops, encoder)
    except (ShipyardError, RecordError) as e:
        return [f"{name}: shipyard cannot derive the loss mask with this template: {e}"], []
    recorded = dialog["samples"]
    for k, a in enumerate(recorded):
        where = f"{name}, sample {k + 1}"
        if k < len(served):
            b = served[k]["input_ids"]
        else:  # the template no longer makes this sample: compare with its plain rendering of the same turns
            last = max(a.get("turns") or [len(record.messages) - 1])
            text = render_text(tokenizer, record.messages[: last + 1], tools=record.tools, kwargs=record.template_kwargs)
            b = (encoder.encode(text, media_of(record.messages[: last + 1])) if encoder is not None
                 else tokenizer(text, add_special_tokens=False)["input_ids"])[: len(a["input_ids"])]
        at = first_difference(a["input_ids"], b)
        if at is not None:
            return [f"{where}: chat template drift at token {at}: training rendered "
                    f"{_show(tokenizer, a['input_ids'], at)}, the exported template renders {_show(tokenizer, b, at)}"], []
        if k < len(served) and (at := first_difference(a["labels"], served[k]["labels"])) is not None:
            trained = a["labels"][at] != IGNORE_INDEX
            return [f"{where}: loss mask drift at token {at} ({_show(tokenizer, b, at)}): training "
                    f"{'supervised' if trained else 'did not supervise'} it, with the exported template's defaults "
                    f"it is {'part of the prompt' if trained else 'generated by the model'} (its generation prompt "
                    "differs from training's)"], []
    if len(served) != len(recorded):
        return [f"{name}: training made {len(recorded)} sample(s) of it, the exported template {len(served)}"], []
    return [], [s["labels"] for s in served]


def template_parity(tokenizer, probe: dict | None, eos_ids: list[int], encoder=None) -> dict:
    """Training-time renderings vs DIR's template (ids and masks), and EOS at the end of every assistant turn."""
    dialogs = recorded_dialogs(probe)
    multi_turn = (probe or {}).get("multi_turn", "as_served")
    stops = eos_token_ids(tokenizer, eos_ids)  # render as training did; whether serving stops is checked below
    problems: list[str] = []
    label_lists: list[list[int]] = []
    if dialogs:
        for dialog in dialogs:
            found, labels = _compare_dialog(tokenizer, dialog, multi_turn, stops, encoder)
            problems += found
            label_lists += labels
    else:
        try:
            label_lists = [s["labels"] for s in render_for_probe(tokenizer, Record(BUILTIN_DIALOG, "verify"), multi_turn, stops)]
        except (ShipyardError, RecordError) as e:
            problems.append(f"shipyard cannot derive the loss mask with this template: {e}")
    ends = [t for labels in label_lists for t in _turn_ends(labels)]
    missing = sorted({tokenizer.convert_ids_to_tokens(t) for t in ends if t not in eos_ids})
    if missing:
        problems.append(
            f"assistant turns end with {missing}, which generation_config.json does not list as EOS "
            f"({eos_ids}): the served model would not stop"
        )
    return {
        "ok": not problems,
        "recorded_at_training": bool(dialogs),
        "dialogs": len(dialogs),
        "tokens": sum(len(labels) for labels in label_lists),
        "problems": problems,
    }


def is_moe(config) -> bool:
    text = config.get_text_config()
    return any((getattr(text, key, 0) or 0) > 1 for key in ("num_experts", "num_local_experts", "n_routed_experts"))


def compare_generations(hf: list[tuple[list[int], list[float]]], vllm: dict, hf_prompts: list[list[int]]) -> list[dict]:
    rows = []
    for (tokens, logprobs), v_tokens, v_logprobs, hf_prompt, v_prompt in zip(
        hf, vllm["token_ids"], vllm["logprobs"], hf_prompts, vllm["prompt_token_ids"]
    ):
        diff = first_difference(tokens, v_tokens)
        matched = len(tokens) if diff is None else diff
        deltas = [abs(a - b) for a, b in zip(logprobs[:matched], v_logprobs[:matched])]
        worst = max(range(len(deltas)), key=deltas.__getitem__) if deltas else None
        rows.append({
            "matched_tokens": matched,
            "total_tokens": len(tokens),
            "first_mismatch": diff,
            "max_abs_logprob_diff": deltas[worst] if deltas else None,
            "max_logprob_diff_token": worst,
            "prompt_ids_equal": hf_prompt == v_prompt,
            "prompt_first_difference": first_difference(hf_prompt, v_prompt),
        })
    return rows


@dataclass
class Prepared:
    """The transformers half of a verification, and the job for the vLLM half."""

    tokenizer: object
    prompt_ids: list[list[int]]
    hf: list[tuple[list[int], list[float]]]
    report: dict
    job: dict
    training_prompt_ids: list[list[int]] | None = None  # recorded at training time (probe), when there are some
    spec_job: dict | None = None  # an MTP head vLLM serves: the speculative-decoding job
    spec_model: object | None = None  # ... and the model with its head, to count acceptance exactly
    references: list[str] | None = None  # a speech-LM's probe: the transcripts of its held-out clips
    eos_ids: list[int] | None = None


def prepare(directory: Path, *, max_new_tokens: int, trust_remote_code: bool) -> Prepared:
    directory = Path(directory)
    adapter = is_adapter_dir(directory)
    if adapter:  # base + adapter: PEFT in transformers, enable_lora + LoRARequest in vLLM
        adapter_config = json.loads((directory / ADAPTER_CONFIG).read_text())
        model_dir = resolve_base_dir(adapter_config["base_model_name_or_path"])
    elif (directory / "config.json").is_file():
        model_dir = directory
    else:
        raise ShipyardError(f"{directory}: neither a model (config.json) nor an adapter ({ADAPTER_CONFIG}) directory")
    probe = read_probe(directory)
    dialogs = probe["prompts"] if probe else BUILTIN_PROMPTS

    started = time.perf_counter()
    model, tokenizer = load_for_verify(model_dir, adapter=directory if adapter else None, trust_remote_code=trust_remote_code)
    encoder = directory_encoder(model_dir, model, tokenizer, trust_remote_code)
    kind = encoder.kind if encoder is not None else "image"
    inputs = [prompt_inputs(tokenizer, d, encoder) for d in dialogs]
    prompt_ids = [x["input_ids"][0].tolist() for x in inputs]
    hf = [greedy(model, x, max_new_tokens) for x in inputs]
    report = {
        "dir": str(directory),
        "prompts": [text_of(d[-1]["content"]) + (f" [+{kind}]" * len(media_of(d[-1:]))) for d in dialogs],
        "max_new_tokens": max_new_tokens,
        "transformers": {"version": transformers.__version__, "ok": True, "seconds": time.perf_counter() - started,
                         "token_ids": [t for t, _ in hf]},
        "kind": "adapter" if adapter else "model",
        "template": template_parity(tokenizer, probe, eos_ids_of(model_dir, tokenizer), encoder),
        "training_reference": reference_check(hf, (probe or {}).get("reference")),
    }
    job = {"kind": "chat", "model": str(model_dir), "tokenizer": str(directory),
           "dialogs": [served_dialog(d) for d in dialogs],
           "max_new_tokens": max_new_tokens, "trust_remote_code": trust_remote_code,
           "max_model_len": model_len_for(model, prompt_ids, max_new_tokens)}
    if encoder is not None:
        job["mm_limits"] = {kind: max(1, max(len(media_of(d)) for d in dialogs))}
    if adapter:
        report["base_model"] = str(model_dir)
        job.update(lora=str(directory), lora_rank=adapter_config["r"], moe=is_moe(model.config))
    prep = Prepared(tokenizer, prompt_ids, hf, report, job, (probe or {}).get("prompt_ids"),
                    references=(probe or {}).get("references"), eos_ids=eos_ids_of(model_dir, tokenizer))
    if not adapter and (layers := speculative.mtp_layers_in(model_dir, model.config)):
        if mtp.why_not_served(model.config):
            report["speculative"] = speculative.not_served(model.config)
        else:
            mtp.attach(model, None, model_dir, seed=0)  # the exported head, read back from DIR
            held_out = (probe or {}).get("held_out") or dialogs
            held_out = held_out[: speculative.MAX_PROMPTS]
            lengths = [prompt_inputs(tokenizer, d, None)["input_ids"].shape[1] for d in held_out]
            max_len = model_len_for(model, [[0] * max(lengths)], speculative.SPEC_MAX_NEW_TOKENS)
            prep.spec_job = speculative.speculative_job(model_dir, directory, model.config, held_out, layers, max_len)
            prep.spec_model = model
    return prep


def logprob_check(rows: list[dict], dtype: str, tolerance: float | None) -> dict:
    """The largest logprob difference over all prompts, where it is, and whether it is within the tolerance."""
    tol = tolerance if tolerance is not None else LOGPROB_TOLERANCE.get(dtype, 1e-1)
    measured = [(r["max_abs_logprob_diff"], i, r["max_logprob_diff_token"]) for i, r in enumerate(rows)
                if r["max_abs_logprob_diff"] is not None]
    diff, prompt, token = max(measured) if measured else (0.0, None, None)
    return {"max_abs_diff": diff, "prompt": prompt, "token": token, "tolerance": tol, "ok": diff <= tol}


def reference_check(hf: list[tuple[list[int], list[float]]], reference: dict | None) -> dict | None:
    """DIR in transformers vs the trained model's own greedy answers recorded at training time."""
    if not reference:
        return None
    tol = LOGPROB_TOLERANCE["float32"] if reference["dtype"] == "float32" else LOGPROB_TOLERANCE["bfloat16"]
    worst = {"max_abs_diff": 0.0, "prompt": None, "token": None, "first_mismatch": None}
    for i, ((tokens, logprobs), ref_tokens, ref_logprobs) in enumerate(zip(hf, reference["token_ids"], reference["logprobs"])):
        n = min(len(tokens), len(ref_tokens))
        diff = first_difference(tokens[:n], ref_tokens[:n])
        if diff is not None and worst["first_mismatch"] is None:
            worst["first_mismatch"] = {"prompt": i, "token": diff}
        for t in range(n if diff is None else diff):
            if abs(logprobs[t] - ref_logprobs[t]) > worst["max_abs_diff"]:
                worst.update(max_abs_diff=abs(logprobs[t] - ref_logprobs[t]), prompt=i, token=t)
    return {**worst, "tolerance": tol, "dtype": reference["dtype"],
            "ok": worst["first_mismatch"] is None and worst["max_abs_diff"] <= tol}


def finish(prep: Prepared, vllm_version: str | None, result: dict | None, allow_missing_vllm: bool,
           logprob_tolerance: float | None = None, spec_result: dict | None = None) -> dict:
    """Compare the vLLM result (None: vLLM not installed) with the transformers half; fill in `ok`."""
    report, tokenizer = prep.report, prep.tokenizer
    vllm_report: dict = {"available": result is not None}
    if result is not None:
        vllm_report["version"] = vllm_version
        if result.get("cannot_serve"):
            vllm_report.update(loaded=False, greedy_match=False, cannot_serve=result["cannot_serve"],
                               error=result["error"])
        elif not result["ok"]:
            vllm_report.update(loaded=False, greedy_match=False, error=result["error"])
        else:
            rows = compare_generations(prep.hf, result, prep.prompt_ids)
            vllm_report.update(
                loaded=True,
                dtype=result["dtype"],
                load_seconds=result["load_seconds"],
                per_prompt=rows,
                greedy_match=all(r["matched_tokens"] == r["total_tokens"] for r in rows),
                prompt_ids_match=all(r["prompt_ids_equal"] for r in rows),
                max_abs_logprob_diff=max((r["max_abs_logprob_diff"] or 0.0) for r in rows),
                logprobs=logprob_check(rows, result["dtype"], logprob_tolerance),
            )
            if prep.training_prompt_ids is not None:
                trained = [a == b for a, b in zip(prep.training_prompt_ids, result["prompt_token_ids"])]
                vllm_report["training_prompt_ids_match"] = all(trained)
                for i, same in enumerate(trained):
                    if not same:
                        at = first_difference(prep.training_prompt_ids[i], result["prompt_token_ids"][i])
                        report["template"]["problems"].append(
                            f"vLLM's prompt ids for prompt {i} differ from the ids training made of it at token {at}: "
                            f"{_show(tokenizer, result['prompt_token_ids'][i], at)} vs training "
                            f"{_show(tokenizer, prep.training_prompt_ids[i], at)}")
                        report["template"]["ok"] = False
            for i, row in enumerate(rows):
                if not row["prompt_ids_equal"]:
                    at = row["prompt_first_difference"]
                    report["template"]["problems"].append(
                        f"vLLM renders prompt {i} differently at token {at}: "
                        f"{_show(tokenizer, result['prompt_token_ids'][i], at)} vs transformers {_show(tokenizer, prep.prompt_ids[i], at)}"
                    )
                    report["template"]["ok"] = False
    report["template_parity"] = report["template"]["ok"]
    report["vllm"] = vllm_report
    if prep.references is not None:
        report["wer"] = transcript_errors(prep, result if vllm_report.get("loaded") else None)
    agrees = vllm_report.get("greedy_match", False) and vllm_report.get("logprobs", {}).get("ok", False)
    vllm_ok = agrees if result is not None else allow_missing_vllm
    reference_ok = report["training_reference"] is None or report["training_reference"]["ok"]
    spec_ok = True
    if prep.spec_job is not None and spec_result is not None:
        n_spec = prep.spec_job["speculative"]["num_speculative_tokens"]
        report["speculative"] = (speculative.speculative_report(prep.spec_model, spec_result, n_spec)
                                 if spec_result["ok"] else {"method": "mtp", "served": True, "lossless": False,
                                                            "error": spec_result["error"]})
        spec_ok = report["speculative"]["lossless"]
    wer_ok = "wer" not in report or report["wer"].get("equal", result is None)
    report["ok"] = bool(report["template_parity"] and vllm_ok and reference_ok and spec_ok and wer_ok)
    return report


def transcript_errors(prep: Prepared, result: dict | None) -> dict:
    """Word error rates of a speech-LM's greedy transcripts of its held-out clips, in transformers and in vLLM
    (each answer cut at its first EOS token)."""
    from shipyard.train.evaluate import word_error_rate

    def texts(token_lists: list[list[int]]) -> list[str]:
        cut = [next((ids[:i] for i, t in enumerate(ids) if t in prep.eos_ids), ids) for ids in token_lists]
        return [prep.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in cut]

    refs = prep.references[: len(prep.hf)]
    out = {"num_clips": len(refs), "transformers": word_error_rate(refs, texts([t for t, _ in prep.hf]))}
    if result is not None:
        out["vllm"] = word_error_rate(refs, texts(result["token_ids"]))
        out["equal"] = out["vllm"] == out["transformers"]
    return out


def verify_many(
    directories: list[Path], *, target: str | None = None, max_new_tokens: int = 32, allow_missing_vllm: bool = False,
    trust_remote_code: bool = False, logprob_tolerance: float | None = None,
) -> list[dict]:
    """Verify several directories (models, adapters, DFlash and EAGLE-3 drafters) with one vLLM worker process: vLLM's import
    and the worker's start are paid once. `target` is a drafter's target (default: the one it was trained for)."""
    preps = [("drafter", drafter.prepare(d, target)) if drafter.is_drafter_dir(d)
             else ("model", prepare(d, max_new_tokens=max_new_tokens, trust_remote_code=trust_remote_code))
             for d in directories]
    available = vllm_available()
    jobs = [job for kind, p in preps for job in ([p["job"]] if kind == "drafter" else
                                                 [p.job] + ([p.spec_job] if p.spec_job else []))]
    # One worker for all jobs: VLLM_TIMEOUT_S for its start and the plain jobs, as much again per speculative job
    # (three engines each).
    timeout = VLLM_TIMEOUT_S * (1 + sum(job["kind"] == "speculative" for job in jobs))
    out = run_jobs(jobs, timeout=timeout) if available else {"vllm_version": None, "results": []}
    results = iter(out["results"])
    reports = []
    for kind, p in preps:
        if kind == "drafter":
            reports.append(drafter.finish(p, out["vllm_version"], next(results, None)))
            continue
        result = next(results, None)
        spec = next(results, None) if p.spec_job and available else None
        reports.append(finish(p, out["vllm_version"], result, allow_missing_vllm, logprob_tolerance, spec))
    return reports


def verify(directory: Path, target: str | None = None, **kwargs) -> dict:
    return verify_many([directory], target=target, **kwargs)[0]


def format_report(report: dict) -> str:
    if report.get("kind") in ("dflash_drafter", "eagle3_drafter"):
        return drafter.format_report(report)
    lines = [f"shipyard verify {report['dir']}"]
    if report.get("kind") == "adapter":
        lines.append(f"  LoRA adapter on {report['base_model']} (PEFT in transformers, LoRARequest in vLLM)")
    hf = report["transformers"]
    n = report["max_new_tokens"]
    lines.append(f"  transformers {hf['version']}: {len(report['prompts'])} prompts x {n} greedy tokens in {hf['seconds']:.1f}s (fp32)")
    v = report["vllm"]
    if not v["available"]:
        lines.append(f"  vLLM: not installed ({INSTALL_HINT}) -> cannot prove the directory serves")
    elif v.get("cannot_serve"):
        lines.append(f"  vLLM {v.get('version', '?')} build cannot serve this adapter: {v['cannot_serve']}; export with "
                     "`shipyard export DIR OUT --merge-lora` and verify OUT (the merged weights serve)")
    elif not v.get("loaded"):
        lines.append(f"  vLLM {v.get('version', '?')}: FAILED to load or generate: {v.get('error')}")
    else:
        lines.append(f"  vLLM {v['version']}: loaded in {v['load_seconds']:.1f}s ({v['dtype']})")
        lines.append(f"    {'prompt':<40} {'greedy tokens equal':>20} {'max |dlogprob|':>15} {'prompt ids':>11}")
        rows = list(zip(report["prompts"], v["per_prompt"]))
        if len(rows) > 16:  # a speech-LM's held-out set: the differing prompts, then the count
            same = [r for _, r in rows if r["matched_tokens"] == r["total_tokens"] and r["prompt_ids_equal"]]
            lines.append(f"    {len(same)}/{len(rows)} prompts: all greedy tokens and prompt ids equal"
                         + ("; the others:" if len(same) < len(rows) else ""))
            rows = [(p, r) for p, r in rows if not (r["matched_tokens"] == r["total_tokens"] and r["prompt_ids_equal"])]
        for prompt, row in rows:
            short = (prompt[:37] + "...") if len(prompt) > 40 else prompt
            lp = row["max_abs_logprob_diff"]
            lines.append(
                f"    {short:<40} {row['matched_tokens']:>13}/{row['total_tokens']:<6} "
                f"{(f'{lp:.1e}' if lp is not None else '-'):>15} {'equal' if row['prompt_ids_equal'] else 'DIFFER':>11}"
            )
        if "training_prompt_ids_match" in v:
            lines.append(f"  prompt ids: vLLM's {'equal' if v['training_prompt_ids_match'] else 'DIFFER from'} the ids "
                         "training made of the same prompts")
        lp = v["logprobs"]
        where = f" (prompt {lp['prompt']}, generated token {lp['token']})" if lp["prompt"] is not None else ""
        lines.append(f"  logprobs: max |dlogprob| {lp['max_abs_diff']:.1e}{where}, tolerance {lp['tolerance']:.0e} for "
                     f"{v['dtype']}: {'OK' if lp['ok'] else 'FAILED: the engines compute different functions'}")
    ref = report.get("training_reference")
    if ref is not None:
        if ref["first_mismatch"] is not None:
            m = ref["first_mismatch"]
            verdict = (f"FAILED: greedy token {m['token']} of prompt {m['prompt']} differs from the trained model's: "
                       "DIR computes a different function than the one trained (edited config or weights?)")
        elif not ref["ok"]:
            verdict = (f"FAILED at prompt {ref['prompt']}, generated token {ref['token']}: DIR computes a different "
                       "function than the one trained (edited config or weights?)")
        else:
            verdict = "OK"
        lines.append(f"  vs the trained model ({ref['dtype']}, recorded at training time): max |dlogprob| "
                     f"{ref['max_abs_diff']:.1e}, tolerance {ref['tolerance']:.0e}: {verdict}")
    t = report["template"]
    source = "recorded at training time" if t["recorded_at_training"] else "built-in dialog (no shipyard_verify.json)"
    if t["ok"]:
        lines.append(f"  template parity: OK ({t.get('dialogs', 1)} dialog(s), {t['tokens']} tokens, {source}); "
                     "assistant turns end with EOS")
    else:
        lines.append(f"  template parity: FAILED ({source})")
        lines.extend(f"    - {p}" for p in t["problems"])
    if "wer" in report:
        w = report["wer"]
        lines.append(f"  word error rate on {w['num_clips']} held-out clips: transformers {w['transformers']:.2%}"
                     + (f", vLLM {w['vllm']:.2%}: {'equal' if w['equal'] else 'DIFFER'}" if "vllm" in w else ""))
    if "speculative" in report:
        lines.extend(speculative.format_speculative(report["speculative"]) if "error" not in report["speculative"]
                     else [f"  MTP speculative decoding in vLLM: FAILED: {report['speculative']['error']}"])
    lines.append("OK: serves in vLLM with the same greedy tokens and logprobs as transformers" if report["ok"] else "NOT OK")
    return "\n".join(lines)
