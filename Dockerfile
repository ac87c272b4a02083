# jitney on CPU: the README's two commands inside a container.
#
#   docker build -t jitney .                      # set-up (make install), then the whole suite (make test)
#   docker build --build-arg RUN_TESTS=0 -t jitney .   # set-up only
#   docker run --rm -p 8000:8000 jitney           # make serve, listening on every interface of the container
#
# Not built in this project's own workplace: building needs the Docker Hub registry, which it cannot reach
# (docs/serving.md#container). tests/test_dockerfile.py checks this file statically: every path it copies exists,
# and it runs the README's commands.
FROM python:3.11-slim-bookworm

# The native kernels (model_runner/csrc) are compiled with the system C++ compiler on first use.
RUN apt-get update && apt-get install -y --no-install-recommends g++ make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/jitney
COPY pyproject.toml Makefile README.md ./
COPY jitney/ jitney/
COPY api/ api/
COPY batcher/ batcher/
COPY model_runner/ model_runner/
COPY benchmarks/ benchmarks/
COPY replicas/ replicas/
COPY sim/ sim/
COPY tests/ tests/
COPY docs/ docs/

# PyPI's plain torch wheel is a multi-GB CUDA build: take the CPU build of the pinned version instead.
ENV PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu \
    JITNEY_CACHE_DIR=/var/cache/jitney
RUN make install TORCH=torch==2.13.0+cpu

# The suite, as CI runs it (about 10 minutes on 2 cores); RUN_TESTS=0 skips it.
ARG RUN_TESTS=1
RUN if [ "$RUN_TESTS" = 1 ]; then make test TORCH=torch==2.13.0+cpu; fi

EXPOSE 8000
# A container's loopback is its own: listen on every interface of the container, so -p can reach it.
# Give --api-key (or JITNEY_API_KEY) before publishing the port anywhere but your own machine.
CMD ["make", "serve", "TORCH=torch==2.13.0+cpu", "ARGS=--host 0.0.0.0 --port 8000"]
