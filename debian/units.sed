# Turns the repository's systemd units (the venv route, /opt/natfail) into the
# ones the Debian package installs in /lib/systemd/system.
s|/opt/natfail/bin/|/usr/bin/|g
s|^Documentation=file:///opt/natfail/README.adoc$|Documentation=man:natfail(8) man:natfailctl(8) file:///usr/share/doc/natfail/README.adoc.gz|
s|^# Install natfail into /opt/natfail (see README.adoc), then, as root:$|# Installed by the natfail Debian package, neither enabled nor started. As root:|
s|^# Install natfail into /opt/natfail (see README.adoc), write$|# Installed by the natfail Debian package, neither enabled nor started. Write|
/^#   cp systemd\/natfail.sysusers /d
/^#     (or: useradd --system/d
/^#   cp systemd\/natfail.service /d
/^#   cp systemd\/natfail-agent.service /d
s|^#   systemctl daemon-reload && systemctl enable --now |#   systemctl enable --now |
