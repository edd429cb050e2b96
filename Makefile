.PHONY: install protos test lint images

install:
	pip install -e '.[dev]'

protos:
	python tools/gen_protos.py

test:
	HF_HUB_OFFLINE=1 python -m pytest -q

lint:
	ruff check .

# The three service images (docs/deploy.md); needs Docker with BuildKit.
VERSION ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
images:
	docker build -f docker/Dockerfile.encoder -t illusion-relay/encoder:$(VERSION) .
	docker build -f docker/Dockerfile.gpu --target stage1 -t illusion-relay/stage1:$(VERSION) .
	docker build -f docker/Dockerfile.gpu --target stage2 -t illusion-relay/stage2:$(VERSION) .
