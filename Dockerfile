# syntax=docker/dockerfile:1
# One image for the aggregator, the agent and the CLI:  docker build -t xctl:0.1.0 .
#
# It runs as an unprivileged user (uid 10001). The aggregator and the CLI need nothing more.
# An agent with the real node probes observes the *host*, so it needs (docs/operations.md):
#   pid: host                 procfs sees every process; zap signals them
#   network_mode: host        network probe reads the host's NICs
#   /dev/kmsg (device + CAP_SYSLOG), /sys read-only, the NVIDIA runtime for NVML,
#   user root with CAP_KILL, CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH
# An agent with only `sim` probes (docker-compose.yml) needs none of that.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY xctl ./xctl
# Wheels for xctl and every dependency (all have manylinux wheels: no compiler needed).
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[gpu]"

FROM python:3.11-slim
RUN groupadd --system --gid 10001 xctl \
 && useradd --system --uid 10001 --gid xctl --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin xctl \
 && mkdir -p /var/log/xctl && chown xctl:xctl /var/log/xctl
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels "xctl[gpu]" && rm -rf /wheels
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
# 7400 events, 7401 control, 7402 queries (aggregator); 9445 aggregator and 9446 agent /metrics.
EXPOSE 7400 7401 7402 9445 9446
ENTRYPOINT ["xctl"]
CMD ["--help"]
