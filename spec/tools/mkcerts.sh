#!/bin/sh
# Test certificates for the TLS specs, made fresh in DIR (no key is kept in
# the repository):
#   ca.pem ca.key          a test CA
#   mx.pem mx.key          signed by the CA: mx.test.example, localhost, 127.0.0.1, ::1
#   other.pem other.key    signed by the CA: other.example, *.other.example (SNI)
#   self.pem self.key      self-signed: mx.test.example, 127.0.0.1
#   rsa.pem rsa.key        signed by the CA with an RSA-2048 key: mx.test.example
#   client.pem client.key  a client certificate signed by the CA
set -eu
DIR=$1
mkdir -p "$DIR"
cd "$DIR"
EC="-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes"
openssl req -x509 $EC -keyout ca.key -out ca.pem -days 3650 -subj "/CN=Moonpost Test CA" \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
sign() { # name subject san [keyargs]
  name=$1 subj=$2 san=$3
  shift 3
  openssl req -new "$@" -keyout "$name.key" -out "$name.csr" -subj "$subj" 2>/dev/null
  printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\n' "$san" > "$name.ext"
  openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -out "$name.pem" \
    -days 3650 -extfile "$name.ext" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
}
sign mx "/CN=mx.test.example" "DNS:mx.test.example,DNS:localhost,IP:127.0.0.1,IP:::1" $EC
sign other "/CN=other.example" "DNS:other.example,DNS:*.other.example" $EC
sign rsa "/CN=mx.test.example" "DNS:mx.test.example,IP:127.0.0.1" -newkey rsa:2048 -nodes
sign client "/CN=client.test.example" "DNS:client.test.example" $EC
openssl req -x509 $EC -keyout self.key -out self.pem -days 3650 -subj "/CN=mx.test.example" \
  -addext "subjectAltName=DNS:mx.test.example,IP:127.0.0.1" 2>/dev/null
chmod 600 ./*.key
