"""Authoring batches (issue 23): sweeps (X/Y/Z axes, Prompt S/R, ranges) and dynamic prompts, planned
torch-free, run as one job, each cell the image its own request makes alone; the grids and the gallery."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffbatch.cli import main
from diffbatch.errors import InputError, SpecError
from diffbatch.io.dynamic import parse_dynamic
from diffbatch.io.gallery import INDEX_HTML
from diffbatch.io.prompts import JobSource, read_job
from diffbatch.io.sweep import parse_sweep
from extras import need


def job(*prompts: str, **source) -> list:
    return read_job(JobSource(prompts=prompts, **source))


def cells(items: list) -> list[tuple]:
    return [(i.spec.prompt, i.spec.seed, i.spec.guidance_scale, i.spec.num_inference_steps, i.spec.scheduler)
            for i in items]


# Planning ----------------------------------------------------------------------------------------------------
def test_a_sweep_makes_every_image_once_per_cell_x_fastest_and_the_cells_share_its_seed() -> None:
    sweep = parse_sweep(["guidance=1,7.5", "steps=10-30 (+10)", "sampler=DPM++ 2M,euler_a"])
    items = job("a", "b", sweep=sweep, images_per_prompt=2, base_seed=100)
    assert len(items) == 2 * 2 * 12
    first = cells(items[:12])
    assert first[:3] == [("a", 100, 1.0, 10, "dpm++_2m"), ("a", 100, 7.5, 10, "dpm++_2m"),
                         ("a", 100, 1.0, 20, "dpm++_2m")]
    assert first[6:7] == [("a", 100, 1.0, 10, "euler_a")]
    # every image of the prompts keeps the seed it has without the sweep (base + k), on all its cells
    assert [items[k * 12].spec.seed for k in range(4)] == [100, 101, 102, 103]
    assert {i.spec.seed for i in items[12:24]} == {101} and {i.spec.prompt for i in items[24:]} == {"b"}
    assert items[1].notes == {"sweep": {"image": 0, "x": [1, "guidance 7.5"], "y": [0, "steps 10"],
                                        "z": [0, "DPM++ 2M"]}}
    assert [i.index for i in items] == list(range(48))


def test_ranges_as_automatic1111_writes_them() -> None:
    def values(text: str) -> list:
        return list(parse_sweep([text]).axes[0].values)

    assert values("steps=10-30 (+10)") == [10, 20, 30]
    assert values("seed=1-4") == [1, 2, 3, 4]
    assert values("guidance=1-2 [3]") == [1.0, 1.5, 2.0]
    assert values("guidance=3-2 (-0.5)") == [3.0, 2.5, 2.0]
    assert values("steps=5, 10-12, 40") == [5, 10, 11, 12, 40]
    assert values("size=32x32,48x32") == [(32, 32), (48, 32)]
    assert values('prompt=red,"blue, dark"') == ["red", "blue, dark"]


def test_prompt_search_and_replace_a_seed_axis_size_and_lora_weights() -> None:
    items = job("a red circle", defaults={"negative_prompt": "red"}, sweep=parse_sweep(["prompt=red,blue"]))
    assert [(i.spec.prompt, i.spec.negative_prompt) for i in items] == [("a red circle", "red"),
                                                                          ("a blue circle", "blue")]
    items = job("a", "b", sweep=parse_sweep(["seed=7,9"]))
    assert [i.spec.seed for i in items] == [7, 9, 7, 9]  # the axis is each line's own seed
    with pytest.raises(InputError, match="--sweep seed with -n 2"):  # copies on seeds no label names: refused
        job("a", "b", sweep=parse_sweep(["seed=7,9"]), images_per_prompt=2)
    items = job("a", sweep=parse_sweep(["size=32x16,16x32"]))
    assert [(i.spec.width, i.spec.height) for i in items] == [(32, 16), (16, 32)]
    items = read_job(JobSource(prompts=("a",), defaults={"loras": {"other": 1.0}},
                               sweep=parse_sweep(["lora:style=0,0.5"])))
    assert [i.spec.loras for i in items] == [(("other", 1.0),), (("other", 1.0), ("style", 0.5))]


def test_the_a1111_fields_are_axes_and_prompt_s_r_may_be_on_two() -> None:
    items = job("a red circle", sweep=parse_sweep(["clip_skip=1,2", "schedule=Karras,SGM Uniform",
                                                   "hires=1.5,2"]))
    assert [(i.spec.clip_skip, i.spec.schedule, i.spec.hires_scale) for i in items][:3] == [
        (1, "karras", 1.5), (2, "karras", 1.5), (1, "sgm_uniform", 1.5)]
    assert len(items) == 8 and items[-1].notes["sweep"]["x"][1] == "clip skip 2"
    items = job("a red circle", defaults={"hires_scale": 2},
                sweep=parse_sweep(["hires_steps=5,10", "denoising=0.4,0.6"]))  # a hires image's strength
    assert [(i.spec.hires_steps, i.spec.strength) for i in items] == [(5, 0.4), (10, 0.4), (5, 0.6), (10, 0.6)]
    items = job("a red circle", sweep=parse_sweep(["prompt=red,blue", "prompt=circle,square"]))
    assert [i.spec.prompt for i in items] == ["a red circle", "a blue circle", "a red square", "a blue square"]


BAD_SWEEPS = {
    "unknown field": (["colour=1,2"], "unknown field 'colour'"),
    "a value the field refuses": (["steps=10,ten"], "'ten' is invalid: must be an integer"),
    "a sampler that does not exist": (["sampler=ddim,nope"], "'nope' is invalid"),
    "guidance out of range": (["guidance=7.5,nan"], "'nan' is invalid"),
    "four axes": (["steps=1", "guidance=1", "seed=1", "strength=0.5"], "at most 3"),
    "an axis twice": (["steps=1,2", "steps=3"], "num_inference_steps is on more than one axis"),
    "no values": (["steps="], "an empty value"),
    "no equals sign": (["steps"], "expected FIELD=V1,V2"),
    "a huge range": (["seed=1-100000"], "at most 1000"),
    "a range the wrong way": (["steps=10-20 (-5)"], "step must go from its start towards its end"),
    "Prompt S/R with one value": (["prompt=red"], "at least one replacement"),
    "a bad LoRA weight": (["lora:x=1,inf"], "'inf' is invalid"),
    "a field swept otherwise": (["width=16,32"], "use size=WxH"),
}


@pytest.mark.parametrize("case", BAD_SWEEPS)
def test_a_bad_axis_is_one_error_naming_the_axis_and_the_value(case: str) -> None:
    texts, expected = BAD_SWEEPS[case]
    with pytest.raises(SpecError) as raised:
        parse_sweep(texts)
    message = str(raised.value)
    assert "\n" not in message and message.startswith("--sweep") and expected in message, message


def test_prompt_search_not_found_names_the_line() -> None:
    with pytest.raises(SpecError, match=r"--prompt #2: --sweep 'prompt=red,blue': Prompt S/R did not find 'red'"):
        job("a red cat", "a cat", sweep=parse_sweep(["prompt=red,blue"]))


def test_an_authored_job_over_the_limit_needs_yes() -> None:
    sweep = parse_sweep(["seed=1-100", "steps=1-11"])
    with pytest.raises(InputError, match=r"the job holds 1100 images .* give --yes"):
        job("a", sweep=sweep)
    assert len(job("a", sweep=sweep, limit=None)) == 1100
    assert len(job(*[f"p{k}" for k in range(1500)])) == 1500  # a plain job has no such limit
    with pytest.raises(InputError, match="more than 1000 images"):
        job("{a|b|c|d|e|f|g|h|i|j}{a|b|c|d|e|f|g|h|i|j}{a|b|c|d|e|f|g|h|i|j}{a|b}",
            dynamic=parse_dynamic("combinatorial"))


def test_dynamic_prompts_every_variant_or_reproducible_random_draws(tmp_path: Path) -> None:
    (tmp_path / "shape.txt").write_text("circle\nsquare\n")
    dynamic = parse_dynamic("combinatorial", str(tmp_path))
    items = job("a {red|blue} __shape__", "plain", dynamic=dynamic, base_seed=5)
    assert [i.spec.prompt for i in items] == ["a red circle", "a red square", "a blue circle", "a blue square",
                                               "plain"]
    assert [i.spec.seed for i in items] == [5, 6, 7, 8, 9]
    assert items[0].notes == {"template": "a {red|blue} __shape__"}
    drawn = job("a {red|blue|green} {circle|square}", dynamic=parse_dynamic("random:6"), base_seed=3)
    assert len(drawn) == 6 and all(i.notes["template"] == "a {red|blue|green} {circle|square}" for i in drawn)
    again = job("a {red|blue|green} {circle|square}", dynamic=parse_dynamic("random:6"), base_seed=3)
    assert [i.spec.prompt for i in drawn] == [i.spec.prompt for i in again]
    other = job("a {red|blue|green} {circle|square}", dynamic=parse_dynamic("random:6"), base_seed=4)
    assert [i.spec.prompt for i in other] != [i.spec.prompt for i in drawn]


def test_dynamic_prompts_and_a_sweep_together() -> None:
    items = job("a {red|blue} circle", dynamic=parse_dynamic("combinatorial"), sweep=parse_sweep(["steps=2,3"]))
    assert [(i.spec.prompt, i.spec.seed, i.spec.num_inference_steps) for i in items] == [
        ("a red circle", 0, 2), ("a red circle", 0, 3), ("a blue circle", 1, 2), ("a blue circle", 1, 3)]


@pytest.mark.parametrize(("template", "expected"), [
    ("a __nowhere__", "unknown wildcard __nowhere__"),
    ("a {red|blue", "malformed dynamic prompt 'a {red|blue'"),
])
def test_a_bad_template_names_the_line(tmp_path: Path, template: str, expected: str) -> None:
    with pytest.raises(InputError) as raised:
        job("fine", template, dynamic=parse_dynamic("combinatorial", str(tmp_path)))
    assert str(raised.value).startswith("--prompt #2: ") and expected in str(raised.value)


@pytest.mark.parametrize("text", ["random", "random:0", "all"])
def test_a_bad_dynamic_mode_is_refused(text: str) -> None:
    with pytest.raises(SpecError, match="use combinatorial, or random:N"):
        parse_dynamic(text)


def test_planning_loads_no_torch() -> None:
    import subprocess
    import sys

    code = ("import sys; from diffbatch.io.prompts import JobSource, read_job; from diffbatch.io.sweep import "
            "parse_sweep; from diffbatch.io.dynamic import parse_dynamic; read_job(JobSource(prompts=('a {b|c}',), "
            "sweep=parse_sweep(['steps=1,2']), dynamic=parse_dynamic('combinatorial'))); "
            "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0


# The command line, end to end on a tiny pipeline ---------------------------------------------------------------
def run(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as png:
        return np.asarray(png.convert("RGB"))


def manifest(out: Path) -> list[dict]:
    lines = (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    return sorted((json.loads(line) for line in lines), key=lambda r: r["index"])


def test_a_sweep_job_writes_each_cell_as_its_request_alone_the_grids_and_resumes(
        capsys: pytest.CaptureFixture, tmp_path: Path, tiny_sd_path: Path) -> None:
    common = ["--model", tiny_sd_path, "--size", "16x16", "--steps", "2"]
    out = tmp_path / "sweep"
    code, _, err = run(capsys, "generate", "--prompt", "a red circle", "--prompt", "a blue square", "--seed", "4",
                       "--sweep", "guidance=1,7.5", "--sweep", "sampler=ddim,euler_a", "--out", out, *common)
    assert code == 0, err
    records = manifest(out)
    assert len(records) == 8 and [r["seed"] for r in records] == [4] * 4 + [5] * 4
    assert sorted(p.name for p in out.glob("xyz*.png")) == ["xyz-001.png", "xyz-002.png"]
    with Image.open(out / "xyz-001.png") as grid:  # 2 columns, 2 rows of 256-pixel cells and their labels
        assert grid.width > 2 * 256 and grid.height > 2 * 256
    page = (out / INDEX_HTML).read_text(encoding="utf-8")
    assert 'data-axis="x"' in page and '<option value="guidance 7.5">' in page and 'href="xyz-002.png"' in page
    # each cell is the image of its own request made alone (a plain job with that cell's settings)
    cell = records[7]
    assert (cell["prompt"], cell["guidance_scale"], cell["scheduler"]) == ("a blue square", 7.5, "euler_a")
    alone = tmp_path / "alone"
    assert run(capsys, "generate", "--prompt", "a blue square", "--seed", "5", "--guidance-scale", "7.5",
               "--scheduler", "euler_a", "--out", alone, *common)[0] == 0
    assert np.array_equal(pixels(out / cell["file"]), pixels(alone / "00000-5.png"))
    # --from a cell's PNG regenerates it
    again = tmp_path / "again"
    assert run(capsys, "generate", "--from", out / records[2]["file"], "--model", tiny_sd_path, "--out", again)[0] == 0
    assert (again / "00000-4.png").read_bytes() == (out / records[2]["file"]).read_bytes()
    # the same command again: nothing to make (the sweep's notes are not part of what an image is)
    code, _, err = run(capsys, "generate", "--prompt", "a red circle", "--prompt", "a blue square", "--seed", "4",
                       "--sweep", "guidance=1,7.5", "--sweep", "sampler=ddim,euler_a", "--out", out, *common)
    assert code == 0 and "skipped 8 images" in err, err


def test_dry_run_prints_the_job_and_writes_nothing(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, printed, err = run(capsys, "generate", "--prompt", "a {red|blue} circle", "--dynamic", "--sweep",
                             "steps=2,3,4", "--sweep", "cfg=1,7.5", "--out", out, "--dry-run",
                             "--model", tmp_path / "no-such-model")  # no model is loaded
    assert code == 0, err
    assert printed.splitlines()[:3] == ["12 images: 2 images of the prompts x 6 sweep cells",
                                        "X: steps 2 | steps 3 | steps 4", "Y: guidance 1 | guidance 7.5"]
    assert "  a blue circle" in printed
    assert not out.exists()


def test_dynamic_job_keeps_the_template_beside_the_prompt(
        capsys: pytest.CaptureFixture, tmp_path: Path, tiny_sd_path: Path) -> None:
    cards = tmp_path / "wildcards"
    cards.mkdir()
    (cards / "shape.txt").write_text("circle\nsquare\n")
    out = tmp_path / "out"
    code, _, err = run(capsys, "generate", "--prompt", "a __shape__", "--dynamic", "--wildcards", cards,
                       "--model", tiny_sd_path, "--size", "16x16", "--steps", "2", "--out", out)
    assert code == 0, err
    assert [(r["prompt"], r["template"]) for r in manifest(out)] == [("a circle", "a __shape__"),
                                                                      ("a square", "a __shape__")]
    with Image.open(out / "00001-1.png") as png:
        assert png.text["parameters"].startswith("a square\n")


@pytest.mark.parametrize(("argv", "named"), [
    (["--sweep", "steps=2,x"], "--sweep 'steps=2,x': 'x' is invalid"),
    (["--sweep", "colour=red"], "unknown field 'colour'"),
    (["--sweep", "seed=1-40", "--sweep", "steps=1-30"], "give --yes"),
    (["--dynamic", "random:0"], "--dynamic 'random:0' is invalid"),
    (["--dynamic", "--wildcards", "TMP/nowhere"], "not a folder"),
    (["--wildcards", "TMP"], "--wildcards needs --dynamic"),
    (["--dynamic", "--prompt", "a __nope__"], "unknown wildcard __nope__"),
])
def test_bad_authoring_is_one_line_exit_2_and_nothing_written(
        capsys: pytest.CaptureFixture, tmp_path: Path, tiny_sd_path: Path, argv: list[str], named: str) -> None:
    out = tmp_path / "out"
    argv = [a.replace("TMP", str(tmp_path)) for a in argv]
    prompt = [] if "--prompt" in argv else ["--prompt", "a {red|blue} circle"]
    code, _, err = run(capsys, "generate", *prompt, *argv, "--model", tiny_sd_path, "--out", out)
    assert code == 2 and err.count("\n") == 1 and named in err, err
    assert not out.exists()


def test_a_strength_sweep_without_an_init_image_is_refused() -> None:
    with pytest.raises(InputError, match="--sweep strength: this image has no init image or hires fix"):
        job("a", sweep=parse_sweep(["strength=0.3,0.6"]))


def test_a_huge_authored_job_is_refused_before_it_is_listed() -> None:
    sweep = parse_sweep(["seed=1-1000", "steps=1-1000", "guidance=1-2 [1000]"])  # 10**9 cells, never listed
    with pytest.raises(InputError, match="the job holds 1000000000 images"):
        job("a", sweep=sweep)
    with pytest.raises(InputError, match="more than 1000 images"):  # 10**9 draws asked, 1001 drawn
        job("a {b|c}", dynamic=parse_dynamic("random:1000000000"))


# The server's batch jobs ---------------------------------------------------------------------------------------
def test_a_batch_job_with_a_sweep_and_dynamic_prompts(tiny_sd_path: Path, tmp_path: Path) -> None:
    import time

    need("fastapi", "httpx", "uvicorn")  # the server extra, for this test alone
    from fastapi.testclient import TestClient

    from diffbatch import Engine, GenerationSpec
    from diffbatch.server import ServerConfig, create_app
    from server_helpers import png_pixels

    engine = Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32")
    with TestClient(create_app(ServerConfig(data_dir=tmp_path / "data", max_batch_lines=10), engine)) as client:
        body = '{"prompt": "a {red|blue} circle", "num_inference_steps": 2, "height": 16, "width": 16}\n'
        made = client.post("/v1/batches?sweep=guidance%3D1,7.5&dynamic=combinatorial", content=body)
        assert made.status_code == 200, made.text
        deadline = time.monotonic() + 120
        while client.get(f"/v1/batches/{made.json()['id']}").json()["status"] == "in_progress":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        rows = [json.loads(x) for x in client.get(f"/v1/batches/{made.json()['id']}/results").text.splitlines()]
        assert [(r["prompt"], r["seed"], r["guidance_scale"], r["sweep"]["x"][1], r["template"]) for r in rows] == [
            ("a red circle", 0, 1.0, "guidance 1", "a {red|blue} circle"),
            ("a red circle", 0, 7.5, "guidance 7.5", "a {red|blue} circle"),
            ("a blue circle", 1, 1.0, "guidance 1", "a {red|blue} circle"),
            ("a blue circle", 1, 7.5, "guidance 7.5", "a {red|blue} circle")]
        last = client.get(rows[3]["url"].replace("http://testserver", "")).content
        [alone] = engine.generate([GenerationSpec(prompt="a blue circle", seed=1, guidance_scale=7.5,
                                                  num_inference_steps=2, height=16, width=16)])
        assert np.array_equal(png_pixels(last), np.asarray(alone.image))
        for query, named in [("sweep=steps%3D2,x", "sweep 'steps=2,x': 'x' is invalid"),
                             ("dynamic=random:0", "dynamic 'random:0' is invalid"),
                             ("sweep=seed%3D1-11", "over the limit of 10")]:
            refused = client.post(f"/v1/batches?{query}", content=body)
            assert refused.status_code == 400 and named in refused.json()["error"]["message"], refused.text
