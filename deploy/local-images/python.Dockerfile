# A stand-in for python:3.11-slim-bookworm (deploy/Dockerfile's base) made from Debian's own
# packages, for a machine that reaches Debian's mirror but no container registry. Built by
# `scripts/container.py base` on top of a `debootstrap --variant=minbase bookworm` root file
# system imported into the engine; nothing here is specific to one machine: the certificate
# authorities the machine trusts for its package proxy arrive in the build context (ca/, made by the script).
ARG ROOTFS_IMAGE
FROM ${ROOTFS_IMAGE}
ENV LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive
COPY ca/ /usr/local/share/ca-certificates/
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv python-is-python3 \
 && update-ca-certificates \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*
CMD ["python3"]
