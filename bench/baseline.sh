#!/bin/sh
# The pipeline users would otherwise run from cron: paged ldapsearch | awk > map && postmap.
# Produces the same virtual-alias map as ldapsync's postfix-virtual exporter for the bench
# directory (forwards of active users, comma lists normalised, plus the static alias lines).
# usage: baseline.sh URI BIND_DN PASSWORD_FILE BASE_DN STATIC_LINES MAP POSTFIX_CONFIG_DIR
set -e
uri=$1 binddn=$2 pwfile=$3 base=$4 static=$5 map=$6 conf=$7
ldapsearch -LLL -o ldif-wrap=no -x -H "$uri" -D "$binddn" -y "$pwfile" -b "$base" \
    -E pr=1000/noprompt '(objectClass=*)' uid emailForward accountStatus mailDisableMessage |
awk -v D=example.org '
BEGIN { RS = ""; FS = "\n" }
{
    uid = ""; fwd = ""; dead = 0
    for (i = 1; i <= NF; i++) {
        line = $i
        if (line ~ /^uid: /) uid = substr(line, 6)
        else if (line ~ /^emailForward: /) {
            v = substr(line, 15); gsub(/ *, */, ",", v)
            fwd = (fwd == "") ? v : fwd "," v
        }
        else if (line ~ /^accountStatus: (inactive|memorial)/) dead = 1
        else if (line ~ /^mailDisableMessage: /) dead = 1
    }
    if (uid != "" && fwd != "" && !dead) print tolower(uid) "@" D "\t" fwd
}' > "$map.tmp"
cat "$static" >> "$map.tmp"
mv "$map.tmp" "$map"
postmap -c "$conf" "hash:$map"
