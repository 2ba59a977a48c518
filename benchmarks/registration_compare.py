"""Follow-up -> baseline registration: SimpleITK vs PyTorch backends vs elastix vs ANTsPy.

    .venv/bin/python benchmarks/registration_compare.py --patients 3 --seed 2026 --profile heldout \\
        --ants-python /path/to/venv-with-antspyx/bin/python

Same cohort, pairs and landmarks as benchmarks/registration_tre.py (truth.json: the same 20
anatomical points in every study; TRE_i = |T(landmark_baseline_i) - landmark_followup_i|, the
baseline pre-contrast fixed, the follow-up pre-contrast moving, without the ablation-zone hint).
Prints TRE median / p90 over all landmarks of the pairs that passed QC (the peers have no QC:
all their pairs count), the worst pair's mean TRE and the median seconds per pair, one row per
method, in one run on the same CPU. The truth contains a smooth deformation up to ~1.5 mm per
study, which rigid/affine maps cannot follow.

Peers (optional extra ``bench`` in pyproject.toml): elastix through ``itk-elastix`` (default
rigid / affine / bspline parameter maps, 3 resolutions, centre-of-gravity start, body mask,
B-spline grid as the torch field's) in this interpreter; ANTsPy (``antspyx``: Rigid, Affine,
SyN) in the interpreter given by ``--ants-python`` (see benchmarks/_ants_register.py for why).
A peer that is not installed is reported as skipped. Threads: 2 everywhere (elastix B-spline: 1,
see _elastix_method).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

THREADS = 2


def _tre(mapped, moving_points) -> np.ndarray:
    return np.linalg.norm(np.asarray(mapped, float) - np.asarray(moving_points, float), axis=1)


def _map(transform, points) -> np.ndarray:
    return np.array([transform.TransformPoint([float(v) for v in p]) for p in points])


# --------------------------------------------------------------------------- pipeline backends
def _pipeline_method(cfg, backend: str, deformable: str, device: str, bias_correction: str = "none"):
    from pipeline.imaging.registration import register_to_baseline

    reg = cfg.registration.model_copy(update={
        "backend": backend, "device": device,
        "inter_study": cfg.registration.inter_study.model_copy(
            update={"backend": backend, "deformable": deformable, "bias_correction": bias_correction})})

    def run(fixed, moving, points):
        tx, qc = register_to_baseline(fixed, moving, reg)
        return qc.ok, _map(tx, points), qc.jacobian_min

    return run


# --------------------------------------------------------------------------- elastix
def _elastix_method(kinds: list[str], grid_spacing_mm: float):
    import itk

    # itk loads its modules lazily (tens of seconds on first use): load them before timing.
    itk.ParameterObject.New()
    itk.ElastixRegistrationMethod  # noqa: B018
    itk.GetMatrixFromArray(np.eye(3))

    def to_itk(img, pixel=np.float32):
        import SimpleITK as sitk

        out = itk.GetImageFromArray(sitk.GetArrayFromImage(img).astype(pixel))
        out.SetOrigin(img.GetOrigin())
        out.SetSpacing(img.GetSpacing())
        out.SetDirection(itk.GetMatrixFromArray(np.array(img.GetDirection()).reshape(3, 3)))
        return out

    def run(fixed, moving, points):
        from pipeline.core.geometry import body_mask
        from pipeline.imaging.registration.metric import metric_mask

        po = itk.ParameterObject.New()
        for kind in kinds:
            pm = po.GetDefaultParameterMap(kind, 3, grid_spacing_mm)
            if kind == "rigid":
                pm["AutomaticTransformInitialization"] = ["true"]
                pm["AutomaticTransformInitializationMethod"] = ["CenterOfGravity"]
            po.AddParameterMap(pm)
        elx = itk.ElastixRegistrationMethod.New(to_itk(fixed), to_itk(moving))
        elx.SetParameterObject(po)
        elx.SetFixedMask(to_itk(metric_mask(body_mask(fixed), THREADS), np.uint8))
        # itk-elastix 0.25.4 segfaults in the B-spline stage with more than one thread here
        # (like InsightSoftwareConsortium/ITKElastix#160); one thread runs (measured ~36 s a pair).
        elx.SetNumberOfThreads(1 if "bspline" in kinds else THREADS)
        elx.SetLogToConsole(False)
        elx.UpdateLargestPossibleRegion()
        tx = elx.ConvertToItkTransform(elx.GetCombinationTransform())
        mapped = np.array([list(tx.TransformPoint([float(v) for v in p])) for p in points])
        return True, mapped, None

    return run


# --------------------------------------------------------------------------- ANTsPy
def _ants_pairs(python: str, pairs: list[dict], work: Path, types: list[str]) -> dict[str, list]:
    """Run every pair through the ANTs worker; {type: [(ok, mapped, seconds), ...]}."""
    import SimpleITK as sitk

    from pipeline.core.geometry import body_mask
    from pipeline.imaging.registration.metric import metric_mask

    out: dict[str, list] = {t: [] for t in types}
    worker = Path(__file__).with_name("_ants_register.py")
    for n, pair in enumerate(pairs):
        paths = {k: str(work / f"ants_{n}_{k}.nii.gz") for k in ("fixed", "moving", "fixed_mask")}
        sitk.WriteImage(pair["fixed"], paths["fixed"])
        sitk.WriteImage(pair["moving"], paths["moving"])
        sitk.WriteImage(metric_mask(body_mask(pair["fixed"]), THREADS), paths["fixed_mask"])
        req = {**paths, "points": np.asarray(pair["fixed_points"], float).tolist(), "types": types, "threads": THREADS}
        env = {**os.environ, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(THREADS), "OMP_NUM_THREADS": str(THREADS)}
        res = subprocess.run([python, str(worker)], input=json.dumps(req), capture_output=True, text=True, env=env,
                             check=True)
        result = json.loads(res.stdout.strip().splitlines()[-1])
        for t in types:
            out[t].append((True, np.array(result[t]["points"]), result[t]["seconds"]))
    return out


def _ants_available(python: str | None) -> str:
    """'' when the ANTs interpreter works, else why not."""
    if not python:
        return "no --ants-python given"
    try:
        subprocess.run([python, "-c", "import ants"], check=True, capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{python} cannot import ants ({type(exc).__name__})"
    return ""


# --------------------------------------------------------------------------- driver
def _load_pairs(work: Path, args, cfg) -> list[dict]:
    from phantom import generate_export
    from pipeline.core.records import SeriesRole
    from pipeline.imaging.volumes import load_series
    from pipeline.ingest.index import index_export

    truth = generate_export(work, args.patients, args.seed, profile=args.profile)
    studies = {s.study_instance_uid: s for s in index_export(work / "export", work / "c.sqlite", cfg.ingest).studies}
    pairs = []
    for patient in truth["patients"]:
        pres = {st["study_instance_uid"]: load_series(studies[st["study_instance_uid"]].with_role(SeriesRole.T1_PRE)[0])
                for st in patient["studies"]}
        for st in patient["studies"]:
            if st["timepoint"] != "follow_up":
                continue
            base = next(b for b in patient["studies"] if b["timepoint"] == "baseline" and b["session"] == st["session"])
            pairs.append({"fixed": pres[base["study_instance_uid"]], "moving": pres[st["study_instance_uid"]],
                          "fixed_points": base["landmarks_pre_lps"], "moving_points": st["landmarks_pre_lps"],
                          "name": f"{patient['patient_id']}:{st['study_instance_uid'][-6:]}"})
    return pairs


def _summary(name: str, results: list[tuple], pairs: list[dict]) -> dict:
    tres = [(_tre(m, p["moving_points"]), ok, s) for (ok, m, s), p in zip(results, pairs)]
    ok = [t for t, passed, _ in tres if passed]
    all_tre = np.concatenate(ok) if ok else np.array([np.nan])
    return {"method": name, "pairs": len(tres), "passed_qc": len(ok),
            "tre_median_mm": round(float(np.median(all_tre)), 2),
            "tre_p90_mm": round(float(np.percentile(all_tre, 90)), 2),
            "worst_pair_mean_tre_mm": round(max((float(t.mean()) for t in ok), default=float("nan")), 2),
            "seconds_median": round(float(np.median([s for _, _, s in tres])), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=3)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--profile", default="heldout")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--device", default="cpu", help="device of the torch backend: auto | cpu | cuda")
    parser.add_argument("--methods", default="default,simpleitk,torch,torch+field,elastix,ants",
                        help="comma-separated subset")
    parser.add_argument("--ants-python", default=os.environ.get("ANTS_PYTHON"),
                        help="interpreter with antspyx installed (default: $ANTS_PYTHON)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(THREADS)
    from pipeline.core.config import load_config

    cfg = load_config(args.config)
    grid = cfg.registration.inter_study.deformable_grid_spacing_mm
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    inter = cfg.registration.inter_study
    runners = {
        # The configured inter-study path as it stands (configs/default.yaml unless --config).
        "default": lambda: _pipeline_method(cfg, cfg.registration.backend_of(inter), inter.deformable, args.device,
                                            inter.bias_correction),
        "simpleitk": lambda: _pipeline_method(cfg, "simpleitk", "none", "cpu"),
        "simpleitk+bspline": lambda: _pipeline_method(cfg, "simpleitk", "bspline", "cpu"),
        "torch": lambda: _pipeline_method(cfg, "torch", "none", args.device),
        "torch+field": lambda: _pipeline_method(cfg, "torch", "field", args.device),
        # N4 bias correction of both images first (inter_study.bias_correction: n4).
        "simpleitk+n4": lambda: _pipeline_method(cfg, "simpleitk", "none", "cpu", "n4"),
        "torch+field+n4": lambda: _pipeline_method(cfg, "torch", "field", args.device, "n4"),
        "elastix rigid": lambda: _elastix_method(["rigid"], grid),
        "elastix affine": lambda: _elastix_method(["rigid", "affine"], grid),
        "elastix bspline": lambda: _elastix_method(["rigid", "affine", "bspline"], grid),
    }
    work = Path(tempfile.mkdtemp(prefix="regcmp_"))
    rows, skipped = [], []
    try:
        pairs = _load_pairs(work, args, cfg)
        print(f"{len(pairs)} follow-up -> baseline pairs ({args.patients} patients, seed {args.seed}, "
              f"profile {args.profile}); torch device {args.device}; {THREADS} threads", flush=True)
        for method in methods:
            names = ([n for n in runners if n.startswith("elastix")] if method == "elastix" else
                     ["ants Rigid", "ants Affine", "ants SyN"] if method == "ants" else [method])
            if method == "elastix":
                try:
                    import itk  # noqa: F401

                    itk.ElastixRegistrationMethod  # noqa: B018 - raises when itk-elastix is missing
                except (ImportError, AttributeError) as exc:
                    skipped.append(f"elastix: itk-elastix not installed ({exc})")
                    continue
            if method == "ants":
                why = _ants_available(args.ants_python)
                if why:
                    skipped.append(f"ants: {why}")
                    continue
                try:
                    by_type = _ants_pairs(args.ants_python, pairs, work, ["Rigid", "Affine", "SyN"])
                except (subprocess.SubprocessError, ValueError, KeyError) as exc:
                    skipped.append(f"ants: worker failed: {type(exc).__name__}: {str(exc)[-300:]}")
                    continue
                for name, t in zip(names, ["Rigid", "Affine", "SyN"]):
                    rows.append(_summary(name, by_type[t], pairs))
                    print(json.dumps(rows[-1]), flush=True)
                continue
            for name in names:
                if name not in runners:
                    skipped.append(f"{name}: unknown method")
                    continue
                run = runners[name]()
                results = []
                try:
                    for pair in pairs:
                        t0 = time.perf_counter()
                        ok, mapped, _ = run(pair["fixed"], pair["moving"], pair["fixed_points"])
                        results.append((ok, mapped, time.perf_counter() - t0))
                except Exception as exc:  # noqa: BLE001 - one method failing must not lose the others
                    skipped.append(f"{name}: failed on pair {len(results) + 1}: {type(exc).__name__}: {exc}")
                    continue
                rows.append(_summary(name, results, pairs))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print("\n| method | passed QC | TRE median / p90 (mm) | worst pair mean TRE (mm) | s/pair |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['passed_qc']}/{r['pairs']} | {r['tre_median_mm']} / {r['tre_p90_mm']} | "
              f"{r['worst_pair_mean_tre_mm']} | {r['seconds_median']} |")
    for s in skipped:
        print(f"skipped: {s}")
    print(json.dumps({"patients": args.patients, "seed": args.seed, "profile": args.profile,
                      "python": sys.version.split()[0], "rows": rows, "skipped": skipped}))


if __name__ == "__main__":
    main()
