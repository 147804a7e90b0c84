# The course's verbs. Each target is a line or two calling the package or a script.
# Newcomers need two: `make course` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MONTH ?= 2021-02
TAXI ?= green
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.ipynb))

.PHONY: help venv kernel course notebooks screenshots lint test test-fast test-slow test-unit test-notebooks services-up services-down services-status \
        data train build serve predict stream-run invoke-server score backfill deploy workers \
        bench-web bench-stream bench-batch bench-images clean

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

# --- environment ---------------------------------------------------------------
venv: $(STAMP) ## create .venv with the pinned dependencies (idempotent)
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# pip compiles the bytecode on one core; compileall does the same files on every core, in half the time.
	$(PY) -m pip install -q --no-compile -c constraints.txt -e '.[dev]'
	$(PY) -c "import compileall, sysconfig; compileall.compile_dir(sysconfig.get_paths()['purelib'], quiet=2, workers=0)"
	$(PY) -m ipykernel install --sys-prefix --name ride-duration --display-name "Python (ride-duration)" >/dev/null
	@# workbench/ and benchmarks/ import from the checkout (a .pth file); they are not in the wheel.
	$(PY) -c "import pathlib, sysconfig; pathlib.Path(sysconfig.get_paths()['purelib'], 'ride_duration_workbench.pth').write_text(str(pathlib.Path.cwd()) + '\n')"
	@touch $@

kernel: venv ## also register the kernel for your user's Jupyter
	$(PY) -m ipykernel install --user --name ride-duration --display-name "Python (ride-duration)"

# --- the two commands ----------------------------------------------------------
course: venv services-up data train ## the whole course, end to end
	$(PY) scripts/run_course.py $(NOTEBOOKS)
	$(PY) scripts/score_report.py --taxi-type green --month 2021-02
	@# The backfill as one flow run (months already scored by the notebooks are skipped: Cached).
	$(PY) scripts/score_backfill.py --taxi-type green --start 2021-01 --end 2021-02

test: venv lint ## lint, unit + integration tests and nbval over every notebook
	$(PY) scripts/run_tests.py
lint: venv ## ruff check and ruff format --check (configured in pyproject.toml); actionlint on the CI workflow
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/actionlint .github/workflows/ci.yml
test-fast: venv ## the tests that start no server (about 10 s)
	$(PY) -m pytest tests -m "not integration" -q
test-slow: venv ## the tests that wait minutes of real time (a dead worker's run scheduled again, about 2 min)
	$(PY) -m pytest tests -m slow -q
notebooks: venv ## re-execute every notebook in place, in order, on a fresh default stack (stops it, clears .local/)
	$(PY) scripts/run_notebooks.py $(NOTEBOOKS)
screenshots: venv ## the MLflow and Prefect UIs into notebooks/img/ (stack up, notebooks 02-06 run)
	$(PY) scripts/screenshots.py

# --- local stack ---------------------------------------------------------------
services-up: venv ## start S3 (SeaweedFS, 4572), Kinesis (moto, 4566), MLflow (5000), Prefect (4200)
	$(PY) -m workbench.stack up
services-down: venv ## stop them (S3 objects stay on disk in .local/seaweedfs)
	$(PY) -m workbench.workers stop
	$(PY) -m workbench.stack down
services-status: venv
	$(PY) -m workbench.stack status

# --- part 1-2: data, model, registry -----------------------------------------
data: venv ## fetch green 2021-01/02 + zones (TLC_MIRROR, checksums, fallback)
	$(PY) -m ride_duration.tlc
train: venv ## train, log to MLflow, register and promote (ALLOW_SYNTHETIC=1 without the real data)
	$(PY) scripts/train.py --promote $(if $(ALLOW_SYNTHETIC),--allow-synthetic)
build: venv ## sdist + wheel into dist/, checked by twine
	$(PY) -m build --outdir dist . && $(PY) -m twine check dist/*

# --- part 3: web service -------------------------------------------------------
serve: venv ## gunicorn on WEB_BIND (default 0.0.0.0:9696) with the production model
	$(PY) -m workbench.stack run -- $(PY) -m ride_duration.web serve
predict: venv ## post the example ride to the web service
	$(PY) scripts/predict_client.py --host localhost:9696
bench-web: venv ## the service vs the 2022 design vs hello world, same load; records docs/figures.json
	$(PY) -m benchmarks.web

# --- part 4: streaming ---------------------------------------------------------
stream-run: venv ## the local Kinesis event source: invokes the stream function
	$(PY) -m workbench.event_source
invoke-server: venv ## the local Lambda invoke endpoint on :8080
	$(PY) -m workbench.invoke
bench-stream: venv ## a Kinesis batch vs the 2022 design; the cold start vs its floor; records docs/figures.json
	$(PY) -m benchmarks.stream

# --- part 5: batch -------------------------------------------------------------
.PHONY: worker
score: venv ## papermill report for MONTH=YYYY-MM into reports/
	$(PY) scripts/score_report.py --taxi-type $(TAXI) --month $(MONTH)
backfill: venv ## score 2021-01..02 in one flow run (scored months are skipped; FORCE=1 rescores; DASK=tcp://host:8786 scales out)
	$(PY) scripts/score_backfill.py --taxi-type $(TAXI) --start 2021-01 --end 2021-02 $(if $(FORCE),--force) $(if $(DASK),--dask $(DASK))
deploy: venv ## create the work pool `ride-duration` and the `monthly` deployment on it (idempotent)
	$(PY) -m workbench.stack run -- $(PY) -m ride_duration.batch deploy
worker: venv ## Prefect's worker on the pool, in the foreground: it runs the deployment's months
	$(PY) -m workbench.stack run -- $(VENV)/bin/prefect worker start --pool ride-duration
workers: venv ## start N such workers in the background (N=2; a demo of several machines); services-down stops them
	$(PY) -m workbench.workers start $(or $(N),2)
bench-batch: venv ## a 12-month backfill: plain loop vs one flow run; Dask 2 workers vs 1, pinned; the work pool's cost
	$(PY) -m benchmarks.batch
bench-images: venv ## each image's installed size, replayed from its Pipfile.lock categories
	$(PY) -m benchmarks.images
figures: venv ## docs/benchmarks.md from docs/figures.json (what every make bench-* records)
	$(PY) -m benchmarks.report

clean:
	rm -rf dist build *.egg-info reports .pytest_cache

# --- AWS (infra/) --------------------------------------------------------------
# infra/stream.yaml with the AWS CLI and Docker (scripts/aws.sh lists its settings: MLFLOW_BUCKET, MODEL_ID, ...).
.PHONY: aws-plan aws-deploy aws-push aws-destroy
aws-plan: ## what aws-deploy would create or change (a change set, not executed)
	scripts/aws.sh plan
aws-deploy: ## streams, buckets, ECR, role, logs; with MODEL_ID + EXPERIMENT_ID also the image and the function
	scripts/aws.sh deploy
aws-push: ## build the Lambda image and push it to the stack's ECR repository (IMAGE_TAG, default the git commit)
	scripts/aws.sh push
aws-destroy: ## delete the stack (the buckets are kept)
	scripts/aws.sh destroy
