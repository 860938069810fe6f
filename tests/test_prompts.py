"""Reading a job: prompt files, JSON lines, stdin, --prompt flags, seeds, init-image pairing, input errors."""

import io
from pathlib import Path

import pytest
from PIL import Image

from diffbatch.errors import InputError, SpecError
from diffbatch.io.images import list_images, load_init_image
from diffbatch.io.prompts import JobSource, read_job


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def save_image(path: Path, size: tuple[int, int] = (16, 16), mode: str = "RGB") -> Path:
    Image.new(mode, size).save(path)
    return path


def prompts_of(items: list) -> list[str]:
    return [item.spec.prompt for item in items]


def test_text_file_has_one_prompt_per_line_skipping_blank_and_comment_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "p.txt", "# a comment\na red circle\n\n   \n  a blue square  \n#x\nstar\n")
    items = read_job(JobSource(prompts_file=path))
    assert prompts_of(items) == ["a red circle", "a blue square", "star"]
    assert [item.where for item in items] == [f"{path}:2", f"{path}:5", f"{path}:7"]


def test_image_k_gets_base_seed_plus_k_across_the_job(tmp_path: Path) -> None:
    path = write(tmp_path / "p.txt", "a\nb\n")
    items = read_job(JobSource(prompts_file=path, images_per_prompt=3, base_seed=100))
    assert prompts_of(items) == ["a"] * 3 + ["b"] * 3
    assert [item.spec.seed for item in items] == list(range(100, 106))
    assert [item.index for item in items] == list(range(6))


def test_jsonl_line_fields_override_flags(tmp_path: Path) -> None:
    path = write(tmp_path / "p.jsonl", '{"prompt": "a", "num_inference_steps": 3}\n\n'
                                       '{"prompt": "b", "negative_prompt": "dull", "scheduler": "euler_a"}\n')
    flags = {"num_inference_steps": 7, "negative_prompt": "blurry", "guidance_scale": 2.0}
    a, b = (item.spec for item in read_job(JobSource(prompts_file=path, defaults=flags)))
    assert (a.num_inference_steps, a.negative_prompt, a.guidance_scale) == (3, "blurry", 2.0)
    assert (b.num_inference_steps, b.negative_prompt, b.scheduler) == (7, "dull", "euler_a")


def test_jsonl_line_seed_is_kept_and_its_copies_count_up_from_it(tmp_path: Path) -> None:
    path = write(tmp_path / "p.jsonl", '{"prompt": "a"}\n{"prompt": "b", "seed": 42}\n{"prompt": "c"}\n')
    items = read_job(JobSource(prompts_file=path, images_per_prompt=2, base_seed=10))
    assert [item.spec.seed for item in items] == [10, 11, 42, 43, 14, 15]


def test_stdin_is_read_as_text_or_as_json_lines(tmp_path: Path) -> None:
    text = read_job(JobSource(prompts_file="-"), stdin=io.StringIO("# c\none\ntwo\n"))
    assert prompts_of(text) == ["one", "two"]
    assert text[1].where == "<stdin>:3"
    jsonl = read_job(JobSource(prompts_file="-"), stdin=io.StringIO('\n{"prompt": "x", "seed": 5}\n'))
    assert [(i.spec.prompt, i.spec.seed) for i in jsonl] == [("x", 5)]


def test_prompt_flags_are_prompts_in_order() -> None:
    items = read_job(JobSource(prompts=("a", "b"), images_per_prompt=2, defaults={"guidance_scale": 1.0}))
    assert prompts_of(items) == ["a", "a", "b", "b"]
    assert items[2].where == "--prompt #2"
    assert all(item.spec.guidance_scale == 1.0 for item in items)


def test_image_folder_pairs_with_prompts_in_sorted_file_order(tmp_path: Path) -> None:
    for name in ("b.png", "a.jpg", "c.png"):
        save_image(tmp_path / name)
    write(tmp_path / "notes.txt", "not an image: skipped")
    items = read_job(JobSource(prompts=("p1", "p2", "p3"), image=str(tmp_path)))
    assert [(i.spec.prompt, Path(i.spec.image).name) for i in items] == [
        ("p1", "a.jpg"), ("p2", "b.png"), ("p3", "c.png")]


def test_one_prompt_serves_every_image_and_one_image_serves_every_prompt(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    images = [save_image(folder / f"{i}.png") for i in range(3)]
    items = read_job(JobSource(prompts=("p",), image=str(folder), images_per_prompt=2))
    assert [Path(i.spec.image).name for i in items] == ["0.png", "0.png", "1.png", "1.png", "2.png", "2.png"]
    assert [i.spec.seed for i in items] == list(range(6))
    items = read_job(JobSource(prompts=("a", "b"), image=str(images[0])))
    assert [i.spec.image for i in items] == [str(images[0])] * 2


def test_strength_flag_applies_only_to_images_with_an_init_image(tmp_path: Path) -> None:
    image = save_image(tmp_path / "x.png")
    path = write(tmp_path / "p.jsonl", f'{{"prompt": "a", "image": "{image}"}}\n{{"prompt": "b"}}\n')
    a, b = (item.spec for item in read_job(JobSource(prompts_file=path, defaults={"strength": 0.5})))
    assert (a.strength, b.strength) == (0.5, None)


def test_image_count_must_match_prompt_count(tmp_path: Path) -> None:
    for i in range(3):
        save_image(tmp_path / f"{i}.png")
    with pytest.raises(InputError, match=r"--image .*3 images but 2 prompts"):
        read_job(JobSource(prompts=("a", "b"), image=str(tmp_path)))


@pytest.mark.parametrize("name, text, error, message", [
    ("p.txt", "", InputError, r"p\.txt: no prompts"),
    ("p.txt", "# only\n\n#comments\n", InputError, r"p\.txt: no prompts"),
    ("p.jsonl", '{"prompt": "a"}\n{"prompt": "b",\n', InputError, r"p\.jsonl:2: malformed JSON"),
    ("p.jsonl", '{"prompt": "a", "stepz": 3}\n', SpecError, r"p\.jsonl:1: unknown field\(s\) stepz"),
    ("p.jsonl", '["a"]\n', InputError, r"p\.jsonl:1: expected a JSON object"),
    ("p.jsonl", '{"negative_prompt": "a"}\n', SpecError, r"p\.jsonl:1: missing field 'prompt'"),
    ("p.jsonl", '\n{"prompt": "a", "strength": 1.5}\n', SpecError, r"p\.jsonl:2: strength=1\.5 is invalid"),
    ("p.jsonl", '{"prompt": "a", "scheduler": "nope"}\n', SpecError, r"p\.jsonl:1: scheduler='nope'.*euler_a"),
])
def test_bad_prompts_file_is_named_with_its_line(tmp_path: Path, name: str, text: str,
                                                 error: type, message: str) -> None:
    path = write(tmp_path / name, text)
    with pytest.raises(error, match=message):
        read_job(JobSource(prompts_file=path))


def test_missing_unreadable_or_absent_prompts_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nope\.txt: prompts file does not exist"):
        read_job(JobSource(prompts_file=str(tmp_path / "nope.txt")))
    with pytest.raises(InputError, match="is a directory"):
        read_job(JobSource(prompts_file=str(tmp_path)))
    (tmp_path / "bin.txt").write_bytes(b"\xc3(bad")  # invalid UTF-8 (bytes after a UTF-16 mark would decode)
    with pytest.raises(InputError, match=r"bin\.txt: not UTF-8"):
        read_job(JobSource(prompts_file=str(tmp_path / "bin.txt")))
    with pytest.raises(InputError, match="no prompts: give a PROMPTS file"):
        read_job(JobSource())
    with pytest.raises(InputError, match="not both"):
        read_job(JobSource(prompts_file=str(tmp_path / "nope.txt"), prompts=("a",)))
    with pytest.raises(SpecError, match="-n 0 is invalid"):
        read_job(JobSource(prompts=("a",), images_per_prompt=0))


def test_load_init_image_gives_rgb_and_names_a_missing_or_unreadable_file(tmp_path: Path) -> None:
    rgba = tmp_path / "a.png"
    Image.new("RGBA", (12, 10), (9, 9, 9, 255)).save(rgba)  # opaque: a transparent one is refused (test_init_images)
    image = load_init_image(rgba)
    assert (image.mode, image.size) == ("RGB", (12, 10))
    assert load_init_image(Image.new("L", (4, 4))).mode == "RGB"
    with pytest.raises(InputError, match=r"line 3: 'missing\.png' does not exist"):
        load_init_image("missing.png", where="line 3")
    write(tmp_path / "fake.png", "not a png")
    with pytest.raises(InputError, match=r"cannot read '.*fake\.png' as an image"):
        load_init_image(tmp_path / "fake.png")


def test_image_folder_without_images_or_missing_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="folder holds no images"):
        list_images(tmp_path)
    with pytest.raises(InputError, match="no such file or directory"):
        list_images(tmp_path / "nope")
