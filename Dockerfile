# riverflow's image: `docker build -t riverflow .`, then `docker run riverflow run scorer`
# (the entry point is the `riverflow` command: the arguments are its subcommand).
#
# Stage 1 builds the wheel; stage 2 installs only that wheel (not editable, no source
# tree, no build tools): examples and the Kafka pom ship as package data, so nothing
# at run time reads a checkout.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY riverflow riverflow
COPY streams streams
COPY features features
COPY models models
COPY monitors monitors
COPY examples examples
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim AS runtime
# a named user with a fixed uid/gid (10001): Kubernetes' runAsUser and fsGroup name it
RUN groupadd --system --gid 10001 riverflow \
    && useradd --system --uid 10001 --gid riverflow --create-home --home-dir /home/riverflow riverflow
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/riverflow-*.whl && rm -rf /wheels
# the learner's index of scored events (RIVERFLOW_SCORED_DIR) lives on a volume mounted
# here: a new volume takes the directory's owner, so the riverflow user can write it
RUN mkdir -p /var/lib/riverflow && chown riverflow:riverflow /var/lib/riverflow
# in a container /metrics and /healthz must be reachable from outside the process
ENV RIVERFLOW_METRICS_HOST=0.0.0.0 \
    PYTHONUNBUFFERED=1
WORKDIR /home/riverflow
USER riverflow
# /healthz of the stage this container runs: its metrics port is RIVERFLOW_METRICS_PORT
# (docker-compose sets it for every stage); unset, the scorer's default 9401 (the
# learner's is 9402, the monitor's 9403: set the variable when running those). 200 =
# healthy; 503 (a server down, the loop stalled) or nothing listening = unhealthy.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('RIVERFLOW_METRICS_PORT', '9401'), timeout=4)"
ENTRYPOINT ["riverflow"]
CMD ["--help"]
