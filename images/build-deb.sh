#!/usr/bin/env bash
# Builds the appliance's Debian package from a clean clone, in one command:
#
#   images/build-deb.sh            -> target/debian/cosilo_<version>_<arch>.deb (path printed last)
#
# What goes in (images/README.md has the layout and why): /usr/bin/cosilo (release, stripped), the
# ONNX Runtime library it loads (the checksum-pinned copy scripts/setup-ort.sh installs) in
# /usr/lib/cosilo, the default site and bridge configuration in /etc/cosilo (conffiles), the
# systemd units, the system user (sysusers.d) and the state directory (tmpfiles.d). Secret keys
# are never in the package: each service makes its own at first start (`cosilo ensure-keys`).
#
# Cross builds (arm64, Jetson-class boxes; NOT verified here, see images/README.md):
#   COSILO_DEB_TARGET=aarch64-unknown-linux-gnu COSILO_ORT_LIB=/path/to/aarch64/libonnxruntime.so.1.31.1 \
#   CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc images/build-deb.sh
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
cd "$ROOT"

ORT_VERSION=1.31.1
TARGET_TRIPLE="${COSILO_DEB_TARGET:-}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
if [ -n "$TARGET_TRIPLE" ]; then
    case "$TARGET_TRIPLE" in
        aarch64-*) ARCH=arm64; STRIP=aarch64-linux-gnu-strip ;;
        x86_64-*) ARCH=amd64; STRIP=strip ;;
        *) echo "error: no Debian architecture known for $TARGET_TRIPLE" >&2; exit 1 ;;
    esac
    BIN="$TARGET_DIR/$TARGET_TRIPLE/release/cosilo"
    ORT_LIB="${COSILO_ORT_LIB:?set COSILO_ORT_LIB to the libonnxruntime.so.$ORT_VERSION}"
else
    ARCH="$(dpkg --print-architecture)"
    STRIP=strip
    BIN="$TARGET_DIR/release/cosilo"
    if [ -z "${COSILO_ORT_LIB:-}" ]; then
        ensure_ort >&2
        ORT_LIB="$ROOT/.ort/libonnxruntime.so.$ORT_VERSION"
    else
        ORT_LIB="$COSILO_ORT_LIB"
    fi
fi
VERSION=$(awk -F'"' '/^\[workspace.package\]/ { p = 1 } p && /^version/ { print $2; exit }' Cargo.toml)
[ -n "$VERSION" ] || { echo "error: no [workspace.package] version in Cargo.toml" >&2; exit 1; }

if [ -n "${COSILO_DEB_PREBUILT:-}" ]; then
    # scripts/test.sh has just built the whole workspace (this binary included); building it again
    # with `-p` would re-resolve features and link a second copy.
    [ -x "$BIN" ] || { echo "error: COSILO_DEB_PREBUILT is set but $BIN is not built" >&2; exit 1; }
    say "using the prebuilt $BIN"
else
    say "cargo build --release -p cosilo-appliance --bin cosilo ${TARGET_TRIPLE:+--target $TARGET_TRIPLE}"
    cargo build --release --quiet -p cosilo-appliance --bin cosilo ${TARGET_TRIPLE:+--target "$TARGET_TRIPLE"} >&2
fi

OUT="$TARGET_DIR/debian"
STAGE="$OUT/cosilo_${VERSION}_${ARCH}"
DEB="$OUT/cosilo_${VERSION}_${ARCH}.deb"
rm -rf "$STAGE" "$DEB"
say "staging $STAGE"
install -d -m 0755 "$STAGE"/{DEBIAN,usr/bin,usr/lib/cosilo,etc/cosilo,lib/systemd/system} \
    "$STAGE"/usr/lib/{sysusers.d,tmpfiles.d} "$STAGE/usr/share/doc/cosilo"
install -m 0755 "$BIN" "$STAGE/usr/bin/cosilo"
"$STRIP" --strip-unneeded --remove-section=.comment --remove-section=.note "$STAGE/usr/bin/cosilo"
install -m 0644 "$ORT_LIB" "$STAGE/usr/lib/cosilo/libonnxruntime.so.$ORT_VERSION"
"$STRIP" --strip-unneeded --remove-section=.comment "$STAGE/usr/lib/cosilo/libonnxruntime.so.$ORT_VERSION"
install -m 0644 images/systemd/cosilo.service images/systemd/cosilo-bridge.service "$STAGE/lib/systemd/system/"
install -m 0644 images/debian/sysusers.conf "$STAGE/usr/lib/sysusers.d/cosilo.conf"
install -m 0644 images/debian/tmpfiles.conf "$STAGE/usr/lib/tmpfiles.d/cosilo.conf"

# The default configuration: the binary's own defaults with the appliance's paths. Every
# substitution must take (a default that changed shape fails the build rather than shipping a
# config that points elsewhere).
substitute() { # file from to
    grep -qF -- "$2" "$1" || { echo "error: '$2' not found in the default $(basename "$1")" >&2; exit 1; }
    local tmp; tmp="$(mktemp)"; awk -v f="$2" -v t="$3" '{ i = index($0, f); if (i) $0 = substr($0, 1, i-1) t substr($0, i+length(f)); print }' "$1" >"$tmp"; mv "$tmp" "$1"
}
SITE="$STAGE/etc/cosilo/site.toml"
BRIDGE="$STAGE/etc/cosilo/bridge.toml"
# The checked-in defaults the binary embeds (a cross-built binary cannot run here to print them).
cp appliance/cosilo/config/site.toml "$SITE"
substitute "$SITE" 'store = "./cosilo-store"' 'store = "/var/lib/cosilo/store"'
substitute "$SITE" 'roster = "roster.toml"' 'roster = "/etc/cosilo/roster.toml"'
substitute "$SITE" 'key = "h1.key"' 'key = "/var/lib/cosilo/keys/h1.key"'
cp bridge/config/bridge.toml "$BRIDGE"
substitute "$BRIDGE" 'secret_file = "/etc/cosilo/deid.key"' 'secret_file = "/var/lib/cosilo/deid.key"'
for f in "$SITE" "$BRIDGE"; do
    sed -i "1i # Installed by the cosilo package. Secret keys live in /var/lib/cosilo (made at first start).\n# After editing: systemctl restart cosilo cosilo-bridge. See /usr/share/doc/cosilo/README.md." "$f"
done
chmod 0644 "$SITE" "$BRIDGE"

install -m 0644 images/debian/copyright "$STAGE/usr/share/doc/cosilo/copyright"
install -m 0644 images/README.md "$STAGE/usr/share/doc/cosilo/README.md"
install -d -m 0755 "$STAGE/usr/share/lintian/overrides"
install -m 0644 images/debian/lintian-overrides "$STAGE/usr/share/lintian/overrides/cosilo"
# A native package's changelog (Debian format), dated by the last commit for reproducible bytes.
DATE="$(git log -1 --format=%aD 2>/dev/null || date -R)"
printf 'cosilo (%s) unstable; urgency=medium\n\n  * Cosilo appliance %s, built from %s.\n\n -- Cosilo engineers <cosilo@example.org>  %s\n' \
    "$VERSION" "$VERSION" "$(git rev-parse --short HEAD 2>/dev/null || echo 'a source tree')" "$DATE" \
    | gzip -9n >"$STAGE/usr/share/doc/cosilo/changelog.gz"
chmod 0644 "$STAGE/usr/share/doc/cosilo/changelog.gz"

# Depends from the ELF files' needed libraries (dpkg-shlibdeps wants a debian/ tree: give it one).
if [ -z "$TARGET_TRIPLE" ]; then
    SHLIB="$(mktemp -d)"; mkdir -p "$SHLIB/debian"; : >"$SHLIB/debian/control"
    DEPENDS="$(cd "$SHLIB" && dpkg-shlibdeps -O -e "$STAGE/usr/bin/cosilo" -e "$STAGE/usr/lib/cosilo/libonnxruntime.so.$ORT_VERSION" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')"
    rm -rf "$SHLIB"
fi
DEPENDS="${DEPENDS:-libc6 (>= 2.34), libgcc-s1 (>= 4.2), libstdc++6 (>= 12)}"
SIZE="$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)"
sed -e "s/@VERSION@/$VERSION/" -e "s/@ARCH@/$ARCH/" -e "s/@DEPENDS@/$DEPENDS/" -e "s/@SIZE@/$SIZE/" \
    images/debian/control.in >"$STAGE/DEBIAN/control"
printf '/etc/cosilo/site.toml\n/etc/cosilo/bridge.toml\n' >"$STAGE/DEBIAN/conffiles"
install -m 0755 images/debian/postinst images/debian/prerm images/debian/postrm "$STAGE/DEBIAN/"
(cd "$STAGE" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | sort -z | xargs -0 md5sum) >"$STAGE/DEBIAN/md5sums"
chmod 0644 "$STAGE/DEBIAN/control" "$STAGE/DEBIAN/conffiles" "$STAGE/DEBIAN/md5sums"

dpkg-deb --root-owner-group -Zxz --build "$STAGE" "$DEB" >&2
rm -rf "$STAGE"
echo "$DEB"
