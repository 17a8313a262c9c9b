#!/bin/sh
# tools/make-test-certs.sh DIR [HOST...] — a throw-away CA, a server certificate and a
# client certificate for trying NBD over TLS (blockd --nbd-listen) and for the tests.
#
# DIR gets: ca-cert.pem ca-key.pem server-cert.pem server-key.pem, and DIR/client/ with
# ca-cert.pem client-cert.pem client-key.pem (the layout libnbd's tls-certificates=DIR
# and qemu's tls-creds-x509 dir=DIR read), and DIR/anon/ with the CA only (a client
# without a certificate). The server certificate names 127.0.0.1, ::1, localhost and
# every HOST given. Valid for 2 days: for trials and tests, not for production.
set -eu
[ $# -ge 1 ] || { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
command -v openssl >/dev/null || { echo "make-test-certs.sh: openssl is not installed (apt-get install openssl)" >&2; exit 1; }
dir=$1
shift
mkdir -p "$dir/client" "$dir/anon"
cd "$dir"
san="IP:127.0.0.1,IP:::1,DNS:localhost"
for h in "$@"; do
  case $h in
    *[!0-9.:]*) san="$san,DNS:$h" ;;
    *) san="$san,IP:$h" ;;
  esac
done
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
key ca-key.pem
openssl req -x509 -new -key ca-key.pem -days 2 -subj /CN=blockd-test-ca -out ca-cert.pem \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
key server-key.pem
openssl req -new -key server-key.pem -subj /CN=blockd -out server.csr
printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' "$san" > server.ext
openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
  -days 2 -extfile server.ext -out server-cert.pem 2>/dev/null
key client/client-key.pem
openssl req -new -key client/client-key.pem -subj /CN=blockd-client -out client.csr
printf 'extendedKeyUsage=clientAuth\n' > client.ext
openssl x509 -req -in client.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
  -days 2 -extfile client.ext -out client/client-cert.pem 2>/dev/null
cp ca-cert.pem client/ca-cert.pem
cp ca-cert.pem anon/ca-cert.pem
rm -f server.csr client.csr server.ext client.ext ca-cert.srl
