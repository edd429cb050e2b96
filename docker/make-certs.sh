#!/usr/bin/env bash
# A private CA and the certificates Illusion Relay's services and clients need (docs/deploy.md).
#   docker/make-certs.sh OUT_DIR [NAMESPACE]
# writes OUT_DIR/ca.crt, ca.key (keep it offline), server.crt/.key and client.crt/.key.
# The server certificate names the three Kubernetes Services (NAMESPACE, default "illusion"), the
# compose service names and localhost (the in-pod probes), and may act as a client too: the probe
# in a pod presents it to its own server when mutual TLS is on. EC P-256 keys, valid 825 days.
set -euo pipefail
out=${1:?usage: $0 OUT_DIR [NAMESPACE]}
ns=${2:-illusion}
days=825
mkdir -p "$out"
cd "$out"
umask 077

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

key ca.key
openssl req -x509 -new -key ca.key -sha256 -days "$days" -subj "/CN=illusion-relay CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out ca.crt

sans="DNS:localhost,IP:127.0.0.1"
for svc in encoder stage1 stage2; do
    sans="$sans,DNS:$svc,DNS:$svc.$ns,DNS:$svc.$ns.svc,DNS:$svc.$ns.svc.cluster.local"
done

sign() {  # sign NAME CN EXTENDED_KEY_USAGE [SANS]
    key "$1.key"
    openssl req -new -key "$1.key" -subj "/CN=$2" -out "$1.csr"
    {
        echo "basicConstraints=critical,CA:FALSE"
        echo "keyUsage=critical,digitalSignature"
        echo "extendedKeyUsage=$3"
        if [ -n "${4:-}" ]; then echo "subjectAltName=$4"; fi
    } > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 \
        -days "$days" -extfile "$1.ext" -out "$1.crt" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
}
sign server "illusion-relay services" "serverAuth,clientAuth" "$sans"
sign client "illusion-relay client" "clientAuth"
rm -f ca.srl
chmod 644 ./*.crt
echo "wrote $out/{ca,server,client}.{crt,key}"
