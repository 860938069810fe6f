# The two commands of the README: `make demo` (install, then generate a demo batch with the embedded model)
# and `make test` (install, then run the test suite). Both set up .venv on a fresh machine.
.PHONY: install demo test lint bench

install:
	bash scripts/install.sh

demo: install
	.venv/bin/diffbatch generate examples/prompts.txt --out outputs/demo -n 2 --seed 0

test: install
	.venv/bin/ruff check src shapes tests benchmarks
	.venv/bin/python -m pytest -p no:cacheprovider --durations=15

bench: install
	.venv/bin/python benchmarks/throughput.py --model tiny --images 48
