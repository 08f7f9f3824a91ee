#!/usr/bin/env bash
# Runs Debian's `jmeter` (2.13) with the XStream shim it needs to load test
# plans (see jmeter-xstream-shim/): compiles the shim once into
# target/jmeter-shim/ (needs javac: Debian's default-jdk-headless), then
# passes every argument on.
#
#   bash e2e/load/jmeter.sh -n -t e2e/load/step.jmx -Jport=8080 -l out.jtl
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out="$here/../../${CARGO_TARGET_DIR:-target}/jmeter-shim"
src="$here/jmeter-xstream-shim/com/thoughtworks/xstream/security/NoTypePermission.java"
jar="$out/xstream-shim.jar"
if [ ! -s "$jar" ] || [ "$src" -nt "$jar" ]; then
  command -v javac >/dev/null || { echo "jmeter.sh: no javac: install default-jdk-headless (./scripts/test.sh does)" >&2; exit 1; }
  rm -rf "$out/classes"; mkdir -p "$out/classes"
  javac -nowarn -source 8 -target 8 -cp /usr/share/java/xstream.jar -d "$out/classes" "$src" 2>/dev/null ||
    javac -cp /usr/share/java/xstream.jar -d "$out/classes" "$src"
  (cd "$out/classes" && jar cf "$jar.tmp" com) && mv "$jar.tmp" "$jar"
fi
JAVA_CLASSPATH="$jar" exec "${JMETER:-jmeter}" "$@"
