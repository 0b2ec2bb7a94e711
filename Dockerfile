# syntax=docker/dockerfile:1
# The ctrloop image: one image for every role, chosen by the subcommand (`train`, `serve`,
# `drive`, ...). Kafka and Redis run in their own containers, so the [local] and [dev] extras
# (the test broker and redis-server) are not installed here.
#
#   docker build -t ctrloop:local .
#   docker run --rm ctrloop:local --help
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, from the CPU index, pinned to pyproject.toml's torch==2.13.0: the PyPI wheel of
# that version pulls gigabytes of CUDA libraries. Its own layer, so a code change does not
# download it again. (tests/unit/test_compose.py checks the pin and the order.)
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

# Then the project; pip sees torch==2.13.0 satisfied and keeps the CPU build.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ctrloop ./ctrloop
COPY service ./service
COPY trainer ./trainer
RUN pip install .

# A non-root user with a numeric id (Kubernetes' runAsNonRoot can verify it). The trainer's
# checkpoint volume is mounted at /var/lib/ctrloop: created here and owned by that user, so a
# fresh named volume (Docker copies the image's ownership into it) is writable.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/ctrloop ctrloop \
    && mkdir -p /var/lib/ctrloop/trainer \
    && chown -R 10001:10001 /var/lib/ctrloop
USER 10001:10001
WORKDIR /home/ctrloop

EXPOSE 8000
ENTRYPOINT ["ctrloop"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
