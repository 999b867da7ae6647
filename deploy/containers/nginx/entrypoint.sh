#!/bin/sh
# Entry point of the nginx stand-in (see Containerfile). deploy/nginx/nginx.conf is written for
# nginx 1.28; Debian's 1.22 lacks two of its directives, so a copy is rewritten before nginx
# starts (the mounted file is left alone), and what changed is printed:
#   - `http2 on;` (1.25.1+) becomes the older `listen ... http2;` parameter;
#   - `server NAME:PORT resolve;` in an upstream (1.27.3+) loses `resolve`: nginx resolves the
#     replicas' name once at start-up, through the container's resolver, and does not notice
#     replicas added or replaced later (restart nginx after scaling);
#   - `resolver 127.0.0.11` (Docker's embedded DNS) is pointed at the container's own name
#     server (podman's aardvark-dns listens on the network's gateway): inert once `resolve`
#     is gone, but kept valid.
set -eu
src=/etc/nginx/nginx.conf
dst=/etc/nginx/nginx-1.22.conf
nameserver=$(awk '$1 == "nameserver" { print $2; exit }' /etc/resolv.conf)
if grep -q '^[[:space:]]*http2 on;' "$src"; then
    sed -e '/^[[:space:]]*http2 on;/d' \
        -e 's/^\([[:space:]]*listen[[:space:]][^;]*\);/\1 http2;/' "$src"
else
    cat "$src"
fi | sed -e 's/^\([[:space:]]*server[[:space:]][^;]*\)[[:space:]]resolve;/\1;/' \
         -e "s/resolver 127\.0\.0\.11/resolver ${nameserver:-127.0.0.11}/" > "$dst"
echo "stand-in nginx $(nginx -v 2>&1 | sed 's/.*nginx\///'): $src rewritten for this version:" >&2
diff "$src" "$dst" >&2 || true
if [ "$#" -gt 0 ] && [ "$1" = nginx ]; then
    shift
    exec nginx -c "$dst" "$@"
fi
exec "$@"
