.PHONY: install protos test lint

install:
	pip install -e '.[dev]'

protos:
	python tools/gen_protos.py

test:
	HF_HUB_OFFLINE=1 python -m pytest -q

lint:
	ruff check .
