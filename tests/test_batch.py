"""`kolors batch` on the tiny model: job formats, names, seeds, bad lines, batching, kill-and-resume, Ray."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kolors import KolorsError, KolorsPipeline
from kolors.batch import MANIFEST, batches, derived_seed, generate, parse_jobs, run
from kolors.cli import main
from kolors.request import Limits, read_parameters, save_png

SMALL = dict(steps=3, width=64, height=64)
MODEL_ARGS = ["--dtype", "float32", "--device", "cpu", "--steps", "3", "--width", "64", "--height", "64"]


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu")


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / MANIFEST).read_text().splitlines()]


def pngs(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.endswith(".png")}


def check_consistent(folder: Path, expected: set[str]) -> None:
    """Exactly the expected PNGs, each complete and recorded once with the seed its parameters carry."""
    assert {p.name for p in folder.iterdir()} == expected | {MANIFEST, ".kolors-batch.lock"}
    rows = manifest(folder)
    assert sorted(r["file"] for r in rows) == sorted(expected)
    for row in rows:
        with Image.open(folder / row["file"]) as im:
            im.load()  # raises on a truncated file
        assert f"Seed: {row['seed']}," in read_parameters(folder / row["file"])


# -------------------------------------------------------------------------------------------------- formats


def by_prompt(folder: Path) -> dict[str, list[dict]]:
    """The manifest's rows per prompt, in image order."""
    rows: dict[str, list[dict]] = {}
    for row in sorted(manifest(folder), key=lambda r: r["index"]):
        rows.setdefault(row["prompt"], []).append(row)
    return rows


def test_text_jobs_names_seeds_and_parameters(pipe, tmp_path):
    jobs = tmp_path / "prompts.txt"
    jobs.write_text("一只猫\n\n  a red apple  \n", encoding="utf-8")
    out = tmp_path / "out"
    summary = run(jobs, out, pipe=pipe, defaults=dict(SMALL, num_images=2), seed=7, progress=False)

    assert (summary.done, summary.skipped, summary.failed) == (4, 0, 0)
    rows = by_prompt(out)
    cat, apple = rows["一只猫"], rows["a red apple"]
    key = apple[0]["file"].rsplit("-", 1)[0]  # named by its content: the prompt's words and a hash
    assert re.fullmatch(r"a_red_apple-[0-9a-f]{10}", key) and cat[0]["file"].startswith("一只猫-")
    check_consistent(out, {r["file"] for r in cat + apple})
    assert [r["file"] for r in apple] == [f"{key}-0.png", f"{key}-1.png"]
    assert apple[0]["keyed_by"] == "content" and apple[0]["line"] == 3 and apple[0]["id"] is None
    # No seed in the job: hashed from the base seed and the key, then + image index.
    assert [r["seed"] for r in apple] == [derived_seed(7, key), derived_seed(7, key) + 1]
    cat_key = cat[0]["file"].rsplit("-", 1)[0]
    assert read_parameters(out / cat[1]["file"]) == (
        "一只猫\nNegative prompt: \nSteps: 3, Sampler: euler, CFG scale: 5.0, "
        f"Seed: {derived_seed(7, cat_key) + 1}, Size: 64x64, Model: {pipe.name}"
    )
    # A rerun makes nothing; another base seed would give other seeds.
    again = run(jobs, out, pipe=pipe, defaults=dict(SMALL, num_images=2), seed=7, progress=False)
    assert (again.done, again.skipped) == (0, 4)
    assert derived_seed(8, key) != derived_seed(7, key)


def test_jobs_without_an_id_are_keyed_by_their_content(pipe, tmp_path, capsys):
    """Reordering a text file used to leave 000001-0.png showing the old line's prompt: now a moved job finds
    its image, a changed one makes a new image, and identical lines are separate jobs."""
    jobs, out = tmp_path / "prompts.txt", tmp_path / "out"
    jobs.write_text("a cat\na dog\na dog\n")
    run(jobs, out, pipe=pipe, defaults=SMALL, progress=False)
    first = {r["file"]: r for r in manifest(out)}
    assert sorted(r["prompt"] for r in first.values()) == ["a cat", "a dog", "a dog"]
    jobs.write_text("a dog\na fox\na dog\na cat\n")  # moved, changed, moved
    summary = run(jobs, out, pipe=pipe, defaults=SMALL, progress=False)
    assert (summary.done, summary.skipped) == (1, 3)
    for row in manifest(out):
        assert read_parameters(out / row["file"]).startswith(row["prompt"] + "\n"), row
    # a changed parameter is a changed job
    summary = run(jobs, out, pipe=pipe, defaults=dict(SMALL, steps=2), progress=False)
    assert (summary.done, summary.skipped) == (4, 0)
    assert "other parameters" not in capsys.readouterr().err


def test_folders_named_by_line_number_resume_without_remaking(pipe, tmp_path, capsys):
    """A folder an earlier kolors filled (000001-0.png for line 1) is not made again after the upgrade."""
    out = tmp_path / "out"
    run([{"prompt": "a cat", "id": "000001"}], out, pipe=pipe, defaults=SMALL, progress=False)
    rows = manifest(out)
    old = [{**r, "id": None} for r in rows]  # as the old rule wrote it: no id, no keyed_by
    for r in old:
        del r["keyed_by"]
    (out / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in old))
    summary = run(["a cat"], out, pipe=pipe, defaults=SMALL, progress=False)
    assert (summary.done, summary.skipped) == (0, 1)
    assert "named by line number by an earlier kolors" in capsys.readouterr().err
    summary = run(["a cat"], out, pipe=pipe, defaults=dict(SMALL, steps=2), progress=False)
    assert summary.done == 1  # another job now: made


def test_batch_has_the_servers_limits_and_one_failure_does_not_stop_the_run(
    pipe, tmp_path, capsys, monkeypatch
):
    jobs = [
        {"prompt": "huge", "width": 100000, "height": 100000},
        {"prompt": "many", "num_images": 100000},
        {"prompt": "long", "steps": 100000000},
        {"prompt": "a cat", "seed": 1},
        {"prompt": "a dog", "seed": 2, "width": 32},
        {"prompt": "a cow", "seed": 3},
    ]

    def broken(*args, **kwargs):
        if kwargs.get("width") == 32:
            raise RuntimeError("CUDA out of memory. Tried to allocate 40.00 GiB")
        return pipe(*args, **kwargs)

    class Pipe:
        def __getattr__(self, name):
            return getattr(pipe, name)

        __call__ = staticmethod(broken)

    out = tmp_path / "out"
    summary = run(jobs, out, pipe=Pipe(), defaults=SMALL, progress=False)
    err = capsys.readouterr().err
    assert [b.line for b in summary.bad_lines] == [1, 2, 3]
    assert "width 100000 is over the limit of 2048" in err and "over the limit of 8" in err
    assert "over the limit of 150" in err
    assert (summary.done, summary.failed) == (2, 4)
    assert re.search(r"failed a_dog-\w+-0.png: RuntimeError: CUDA out of memory", err), err
    assert sorted(r["prompt"] for r in manifest(out)) == ["a cat", "a cow"]
    # the limits are the caller's to set
    specs, bad = parse_jobs([{"prompt": "many", "num_images": 20}], limits=Limits(max_images=20))
    assert not bad and len(specs) == 20
    assert parse_jobs([{"prompt": "many", "num_images": 20}])[1]  # the default: 8 per job


def test_jsonl_fields_ids_and_bad_lines(pipe, tmp_path, capsys):
    jobs = tmp_path / "jobs.jsonl"
    lines = [
        {"prompt": "a cat", "seed": 42, "id": "cat", "num_images": 2},
        {"prompt": "a dog", "id": "../../evil/dog", "negative_prompt": "blurry", "guidance": 1, "seed": 5},
        "{not json",
        {"prompt": "a fox", "step": 4},  # unknown field (typo): reported, not ignored
        {"prompt": "a bird", "steps": 0},
        {"prompt": "a cow", "id": "CAT"},  # same files as line 1 on a case-insensitive disk
        {"prompt": "a hen", "width": 60},
        {"prompt": "a yak", "steps": 2, "sampler": "dpmpp-2m"},
    ]
    jobs.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "out"
    summary = run(jobs, out, pipe=pipe, defaults=SMALL, progress=False)

    err = capsys.readouterr().err
    assert [b.line for b in summary.bad_lines] == [3, 4, 5, 6, 7] and summary.failed == 5
    for n, words in [(3, "not valid JSON"), (4, "'step'"), (5, "steps"), (6, "line 1"), (7, "width 60")]:
        assert re.search(rf"jobs.jsonl line {n}: .*{re.escape(words)}", err), (n, err)
    (yak,) = by_prompt(out)["a yak"]
    check_consistent(out, {"cat-0.png", "cat-1.png", "_.._evil_dog-0.png", yak["file"]})
    rows = {r["file"]: r for r in manifest(out)}
    assert [rows["cat-0.png"]["seed"], rows["cat-1.png"]["seed"]] == [42, 43]
    assert rows["_.._evil_dog-0.png"] | {"model": None} == {
        "file": "_.._evil_dog-0.png",
        "id": "../../evil/dog",
        "keyed_by": "id",
        "line": 2,
        "index": 0,
        "seed": 5,
        "prompt": "a dog",
        "negative_prompt": "blurry",
        "steps": 3,
        "guidance": 1.0,
        "sampler": "euler",
        "schedule": None,
        "width": 64,
        "height": 64,
        "loras": [],
        "strength": 0.3,
        "mask_blur": 4.0,
        "mask_invert": False,
        "masked_content": "original",
        "inpaint_padding": None,
        "paste_back": True,
        "image": None,
        "image_hash": None,
        "mask": None,
        "mask_hash": None,
        "ip_image": None,
        "ip_scale": 0.5,
        "model": None,
    }
    assert (yak["steps"], yak["sampler"], yak["line"]) == (2, "dpmpp-2m", 8)
    assert not (tmp_path / "evil").exists()


def test_strict_stops_at_the_first_bad_line_before_any_image(pipe, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a cat"}\n{"prompt": "a dog", "seed": -1}\n')
    with pytest.raises(KolorsError, match=r"jobs.jsonl line 2: seed must be a whole number between 0 and"):
        run(jobs, tmp_path / "out", pipe=pipe, defaults=SMALL, strict=True, progress=False)
    assert not (tmp_path / "out").exists()


def test_csv_jobs(pipe, tmp_path, capsys):
    jobs = tmp_path / "jobs.csv"
    jobs.write_text(
        'id,prompt,seed,steps,category\np1,"a cat, sitting",3,,animals\np2,a dog,x,2,animals\n,a cow,11,2,\n',
        encoding="utf-8",
    )
    summary = run(jobs, tmp_path / "out", pipe=pipe, defaults=SMALL, progress=False)
    err = capsys.readouterr().err
    assert "ignoring columns 'category'" in err
    assert [b.line for b in summary.bad_lines] == [3] and "seed must be a whole number" in err
    rows = {r["file"]: r for r in manifest(tmp_path / "out")}
    cow = by_prompt(tmp_path / "out")["a cow"][0]
    assert set(rows) == {"p1-0.png", cow["file"]}
    assert (rows["p1-0.png"]["prompt"], rows["p1-0.png"]["seed"], rows["p1-0.png"]["steps"]) == (
        "a cat, sitting",
        3,
        3,  # an empty cell takes the default
    )
    assert (cow["seed"], cow["steps"], cow["line"]) == (11, 2, 4)


def test_whole_file_problems_are_one_error(tmp_path):
    csv_file = tmp_path / "jobs.csv"
    csv_file.write_text("text,seed\na cat,1\n")
    with pytest.raises(KolorsError, match="no 'prompt' column"):
        parse_jobs(csv_file)
    array = tmp_path / "jobs.json"
    array.write_text('[{"prompt": "a cat"}]\n')
    with pytest.raises(KolorsError, match="JSON array; write one JSON object per line"):
        parse_jobs(array)
    latin1 = tmp_path / "p.txt"
    latin1.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(KolorsError, match="not UTF-8"):
        parse_jobs(latin1)
    with pytest.raises(KolorsError, match="unknown default"):
        parse_jobs(["a cat"], defaults={"step": 4})


# -------------------------------------------------------------------------------------------------- batching


def test_batched_outputs_equal_single_runs(pipe, tmp_path):
    jobs = [
        {"id": "j1", "prompt": "a cat", "seed": 1, "num_images": 2},
        {"id": "j2", "prompt": "a dog", "seed": 9, "negative_prompt": "blurry"},
        {"id": "j3", "prompt": "a cat", "seed": 20, "steps": 2},  # other settings: its own pipeline call
        {"id": "j4", "prompt": "a fox", "seed": 4, "guidance": 1.0},  # no guidance: no negative embeddings
        {"id": "j5", "prompt": "a hen", "seed": 6},
    ]
    specs, bad = parse_jobs(jobs, defaults=SMALL)
    assert not bad
    chunks = list(batches(specs, 4))
    assert [[s.file for s in c] for c in chunks] == [
        ["j1-0.png", "j1-1.png", "j2-0.png", "j5-0.png"],
        ["j3-0.png"],
        ["j4-0.png"],
    ]
    pipe.set_progress_bar_config(disable=True)
    singles = {}
    for chunk in chunks:
        batched = generate(pipe, chunk, output_type="np")
        for spec, image in zip(chunk, batched, strict=True):
            request = spec.request
            singles[spec.file] = pipe(
                request.prompt,
                negative_prompt=request.negative_prompt,
                num_inference_steps=request.steps,
                guidance_scale=request.guidance,
                height=request.height,
                width=request.width,
                seed=request.seed,
                output_type="np",
            ).images[0]
            np.testing.assert_allclose(image, singles[spec.file], atol=1e-4)

    # And through a whole run: the PNGs of --batch-size 4 are the single images.
    summary = run(jobs, tmp_path / "out", pipe=pipe, defaults=SMALL, batch_size=4, progress=False)
    assert summary.done == 6
    for name, single in singles.items():
        diff = np.abs(pixels(tmp_path / "out" / name) - (single * 255).round())
        assert diff.max() <= 1, name  # uint8 rounding of float-level differences


def test_prompt_cache_encodes_each_text_once(pipe):
    pipe.prompt_cache.clear()  # the module's pipeline has seen these texts in other tests
    calls = []
    encode = pipe.encode_prompt
    pipe.encode_prompt = lambda texts, **kw: calls.append(list(texts)) or encode(texts, **kw)
    try:
        first = pipe.encode_texts(["a cat", "a dog", "a cat"], ["", "", ""])
        pipe.encode_texts(["a dog", "a cow"], ["", ""])
    finally:
        del pipe.encode_prompt
    assert calls == [["a cat", "a dog", ""], ["a cow"]]
    assert first.prompt_embeds.shape[0] == first.negative_prompt_embeds.shape[0] == 3
    assert torch.equal(first.prompt_embeds[0], first.prompt_embeds[2])


# -------------------------------------------------------------------------------------------------- resume


def test_sigkill_then_rerun_finishes_every_image_once(tiny_model_dir, tmp_path, capsys):
    jobs = tmp_path / "prompts.txt"
    jobs.write_text("".join(f"prompt number {i}\n" for i in range(4)))
    out = tmp_path / "out"
    argv = ["batch", str(jobs), "--output", str(out), "--model", str(tiny_model_dir), *MODEL_ARGS]
    argv += ["--num-images", "2", "--batch-size", "2", "--steps", "4", "--quiet"]
    expected = {f"{spec.file}" for spec in parse_jobs(jobs, defaults=dict(SMALL, steps=4, num_images=2))[0]}
    assert len(expected) == 8

    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "kolors.cli", *argv], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.is_dir() and pngs(out):
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()  # still running: the kill lands mid-way
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    made_before = pngs(out)
    assert 1 <= len(made_before) < len(expected)

    capsys.readouterr()
    assert main(argv) == 0
    check_consistent(out, expected)
    # Nothing made twice: every PNG that survived the kill is kept (recorded, or re-added if the kill came
    # between its rename and its manifest row), only the others are made.
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{len(expected) - len(made_before)} done, {len(made_before)} skipped" in summary


def test_resume_repairs_what_a_crash_leaves(pipe, tmp_path, capsys):
    jobs = [{"prompt": f"a cat {i}", "seed": i} for i in range(5)]
    out = tmp_path / "out"
    run(jobs, out, pipe=pipe, defaults=SMALL, progress=False)
    expected = pngs(out)
    rows = manifest(out)
    # A PNG renamed into place but not yet recorded (kill between rename and append): kept and recorded.
    orphan = out / rows[4]["file"]
    orphan_mtime = orphan.stat().st_mtime_ns
    # A PNG under a final name made for another request: made again.
    wrong = out / rows[3]["file"]
    save_png(Image.new("RGB", (64, 64)), wrong, "another prompt\nNegative prompt: \nSteps: 3")
    # A PNG deleted by the user: its row is dropped and the image made again.
    (out / rows[0]["file"]).unlink()
    # A kill during a write and during an append: a temp file, a torn last line.
    (out / ".000002-0-abc123.png.tmp").write_bytes(b"\x89PNG half")
    text = "".join(json.dumps(r) + "\n" for r in rows[:3]) + json.dumps(rows[3])[:40]
    (out / MANIFEST).write_text(text)

    summary = run(jobs, out, pipe=pipe, defaults=SMALL, progress=False)
    assert (summary.done, summary.skipped, summary.failed) == (2, 3, 0)
    check_consistent(out, expected)
    assert orphan.stat().st_mtime_ns == orphan_mtime
    assert f"Seed: {rows[3]['seed']}," in read_parameters(wrong)


def test_a_quantized_text_encoder_is_named_and_resumes(tiny_model_dir, tmp_path):
    """int8 changes the image, so its parameters say so; a finished image the manifest lost is still found."""
    quant = KolorsPipeline.from_pretrained(
        tiny_model_dir, dtype=torch.float32, device="cpu", text_encoder_quant="int8"
    )
    jobs, out, label = [{"prompt": "a cat", "seed": 1}], tmp_path / "out", f"{quant.name} (text encoder int8)"
    run(jobs, out, pipe=quant, defaults=SMALL, progress=False)
    (row,) = manifest(out)
    assert row["model"] == label and read_parameters(out / row["file"]).endswith(f", Model: {label}")
    (out / MANIFEST).unlink()  # killed between the PNG's rename and its manifest row
    summary = run(jobs, out, pipe=quant, defaults=SMALL, progress=False)
    assert (summary.done, summary.skipped) == (0, 1) and manifest(out) == [row]


def test_changed_job_keeps_the_finished_image_and_says_so(pipe, tmp_path, capsys):
    out = tmp_path / "out"
    run([{"prompt": "a cat", "id": "x", "seed": 1}], out, pipe=pipe, defaults=SMALL, progress=False)
    summary = run([{"prompt": "a dog", "id": "x", "seed": 1}], out, pipe=pipe, defaults=SMALL, progress=False)
    assert (summary.done, summary.skipped) == (0, 1)
    assert "made with other parameters" in capsys.readouterr().err


def test_second_run_on_the_same_folder_is_refused(pipe, tmp_path):
    fcntl = pytest.importorskip("fcntl")
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".kolors-batch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(KolorsError, match="another kolors batch is writing"):
            run(["a cat"], out, pipe=pipe, defaults=SMALL, progress=False)


def test_cli_errors_are_one_line(tiny_model_dir, tmp_path, capsys):
    assert main(["batch", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o")]) == 2
    assert (
        capsys.readouterr().err.strip() == f"kolors: error: jobs file not found: {tmp_path / 'missing.jsonl'}"
    )
    jobs = tmp_path / "p.txt"
    jobs.write_text("a cat\n")
    assert main(["batch", str(jobs), "-o", str(tmp_path / "o"), "--batch-size", "0"]) == 2
    assert "batch size must be" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # not an option of batch: its --help does not list it either
        main(["batch", str(jobs), "-o", str(tmp_path / "o"), "--image", "x.png"])
    assert e.value.code == 2 and "unrecognized arguments: --image" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------- Ray


def test_ray_missing_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    jobs = tmp_path / "p.txt"
    jobs.write_text("a cat\n")
    assert main(["batch", str(jobs), "-o", str(tmp_path / "o"), "--ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == "kolors: error: --ray needs Ray Data, which is not installed; "
        'install it with: pip install "kolors[ray]"'
    )


def test_ray_checks_a_local_model_folder_before_starting(tmp_path):
    ray = pytest.importorskip("ray")
    with pytest.raises(KolorsError, match="is incomplete"):
        run(["a cat"], tmp_path / "out", model=tmp_path, ray=True, progress=False)
    assert not ray.is_initialized()


def test_ray_path_matches_the_local_path(pipe, tiny_model_dir, tmp_path):
    ray = pytest.importorskip("ray")
    jobs = [{"prompt": f"a cat {i}", "seed": i, "num_images": 1 + i % 2} for i in range(4)]
    jobs.append({"prompt": "a dog", "seed": 3, "steps": 2})
    local = run(jobs, tmp_path / "local", pipe=pipe, defaults=SMALL, batch_size=2, progress=False)

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False)
    try:
        options = dict(model=tiny_model_dir, dtype="float32", device="cpu", defaults=SMALL, batch_size=2)
        options.update(ray=True, ray_actors=2, ray_cpus_per_actor=1, progress=False)
        on_ray = run(jobs, tmp_path / "ray", **options)
        assert (on_ray.done, on_ray.failed) == (local.done, 0) == (7, 0)
        # Resume works the same: only the deleted image is made again.
        (tmp_path / "ray" / by_prompt(tmp_path / "ray")["a cat 1"][1]["file"]).unlink()
        again = run(jobs, tmp_path / "ray", **options)
        assert (again.done, again.skipped) == (1, 6)
    finally:
        ray.shutdown()

    check_consistent(tmp_path / "ray", pngs(tmp_path / "local"))
    by_file = lambda rows: sorted(rows, key=lambda r: r["file"])  # noqa: E731
    assert by_file(manifest(tmp_path / "ray")) == by_file(manifest(tmp_path / "local"))
    for name in pngs(tmp_path / "local"):
        diff = np.abs(pixels(tmp_path / "ray" / name) - pixels(tmp_path / "local" / name))
        assert diff.max() <= 1, name


def test_batch_writes_through_no_link_it_did_not_make(pipe, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    jobs = [{"prompt": "a cat", "seed": 1, "id": "cat"}]
    for name in (".kolors-batch.lock", MANIFEST):
        out = tmp_path / f"out-{name}"
        out.mkdir()
        (out / name).symlink_to(victim)
        with pytest.raises(KolorsError, match="symbolic link"):
            run(jobs, out, pipe=pipe, defaults=SMALL, progress=False)
        assert victim.read_text() == "precious\n" and not pngs(out)
    # an image name or the manifest's temporary file pointing elsewhere: replaced, the target untouched
    out = tmp_path / "out"
    run(jobs, out, pipe=pipe, defaults=SMALL, progress=False)
    (out / "cat-0.png").unlink()
    (out / "cat-0.png").symlink_to(victim)
    (out / ".manifest.jsonl.tmp").symlink_to(victim)
    summary = run(jobs, out, pipe=pipe, defaults=SMALL, progress=False)
    assert summary.done == 1 and not (out / "cat-0.png").is_symlink()
    assert victim.read_text() == "precious\n"
    check_consistent(out, {"cat-0.png"})


def test_the_lock_file_is_never_truncated(pipe, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".kolors-batch.lock").write_text("kept")
    run(["a cat"], out, pipe=pipe, defaults=SMALL, progress=False)
    assert (out / ".kolors-batch.lock").read_text() == "kept"
