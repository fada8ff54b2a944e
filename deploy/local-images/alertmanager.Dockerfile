# Alertmanager from Debian's package, for deploy/compose.yaml where its image cannot be pulled
# (`scripts/container.py monitoring`). The same command-line flags as the upstream image.
ARG BASE
FROM ${BASE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends prometheus-alertmanager \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/* \
 && install -d -o nobody -g nogroup /alertmanager
USER nobody
WORKDIR /alertmanager
EXPOSE 9093
ENTRYPOINT ["/usr/bin/prometheus-alertmanager"]
CMD ["--config.file=/etc/alertmanager/alertmanager.yml", "--storage.path=/alertmanager"]
