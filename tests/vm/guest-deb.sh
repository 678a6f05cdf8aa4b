# The cgtproxy VM test, the Debian package's part: sourced by guest-test.sh,
# whose report/check/pass/fail/evidence helpers it uses.
#   deb_install: apt installs the payload's .deb as a user would (offline:
#     its dependencies are in the image), checks that installing started and
#     enabled nothing, that `systemctl enable --now cgtproxy` then runs the
#     built-in default, and stops it again to write the configuration
#     (guest-test.sh starts it).
#   deb_purge: with the daemon running, reinstalls the package as an upgrade
#     (the daemon keeps running); then, with both units enabled, apt purges
#     it and checks what is left: no rules, no package file, no unit, no
#     enable link, and the administrator's configuration untouched.

deb_install() {
  local debs=("$P"/cgtproxy_*.deb)
  if [ ${#debs[@]} != 1 ] || [ ! -f "${debs[0]}" ]; then
    fail deb-apt-install "want one cgtproxy_*.deb in the payload, have: ${debs[*]}"
    return
  fi
  info "installing $(basename "${debs[0]}")"
  if DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    "${debs[0]}" >/tmp/apt-install.log 2>&1; then
    pass deb-apt-install
  else
    fail deb-apt-install "apt-get install failed"; evidence 40 </tmp/apt-install.log
  fi
  check deb-binary-on-path test "$(command -v cgtproxy)" = /usr/bin/cgtproxy
  info "$(cgtproxy --version)"
  check deb-unit-from-package test "$(systemctl show -P FragmentPath cgtproxy.service)" = /usr/lib/systemd/system/cgtproxy.service
  check deb-forward-unit-from-package test "$(systemctl show -P FragmentPath cgtproxy-forward.service)" = /usr/lib/systemd/system/cgtproxy-forward.service
  local state
  state=$(systemctl is-active cgtproxy.service cgtproxy-forward.service | tr '\n' ' ')
  check deb-install-starts-nothing test "$state" = "inactive inactive "
  state=$(systemctl is-enabled cgtproxy.service cgtproxy-forward.service | tr '\n' ' ')
  check deb-install-enables-nothing test "$state" = "disabled disabled "
  check deb-man-page test -s /usr/share/man/man1/cgtproxy-run.1.gz
  check deb-bash-completion bash -c '. /usr/share/bash-completion/completions/cgtproxy && complete -p cgtproxy'

  # `systemctl enable --now cgtproxy` right after installing: the built-in
  # default configuration (no /etc/cgtproxy/config.json yet).
  check deb-enable-now-without-config systemctl enable --now cgtproxy.service
  check deb-builtin-default-table nft list table inet cgtproxy
  if journalctl -u cgtproxy.service -o cat --no-pager | grep -q 'running the built-in default'; then
    pass deb-says-builtin-default
  else fail deb-says-builtin-default "no log line saying the built-in default runs"; fi
  check deb-stop-before-config systemctl stop cgtproxy.service

  # What the README tells the user to do next: their own configuration.
  install -d -m 0755 /etc/cgtproxy
  install -m 0644 "$P/config.json" /etc/cgtproxy/config.json
}

deb_purge() {
  systemctl is-active --quiet cgtproxy.service || systemctl start cgtproxy.service
  # An upgrade (the same package again: prerm upgrade, postinst configure
  # OLD-VERSION) leaves a running daemon running and says it runs the old binary.
  local pid
  pid=$(main_pid)
  if dpkg -i "$P"/cgtproxy_*.deb >/tmp/dpkg-reinstall.log 2>&1 && [ "$(main_pid)" = "$pid" ]; then
    pass deb-upgrade-keeps-running
  else
    fail deb-upgrade-keeps-running "MainPID $pid -> $(main_pid)"; evidence 40 </tmp/dpkg-reinstall.log
  fi
  if grep -q 'cgtproxy.service still runs the old binary' /tmp/dpkg-reinstall.log; then
    pass deb-upgrade-names-running-unit
  else fail deb-upgrade-names-running-unit "no note"; evidence 40 </tmp/dpkg-reinstall.log; fi
  systemctl enable --quiet cgtproxy-forward.service
  local files
  files=$(dpkg-query -L cgtproxy | while read -r f; do [ -f "$f" ] && echo "$f"; done)
  if DEBIAN_FRONTEND=noninteractive apt-get purge -y -q cgtproxy >/tmp/apt-purge.log 2>&1; then
    pass deb-apt-purge
  else
    fail deb-apt-purge "apt-get purge failed"; evidence 40 </tmp/apt-purge.log
  fi
  # prerm stopped the daemon, which took its rules with it.
  if has_table || [ "$(rule_count 4)$(rule_count 6)" != 00 ]; then
    fail deb-purge-rules-gone "table or ip rules left"; netstate | evidence
  else pass deb-purge-rules-gone; fi
  local left
  left=$(for f in $files; do [ -e "$f" ] && echo "$f"; done)
  if [ -z "$files" ]; then fail deb-purge-files-gone "dpkg listed no files before the purge"
  elif [ -n "$left" ]; then fail deb-purge-files-gone "left: $(echo "$left" | tr '\n' ' ')"
  else pass deb-purge-files-gone; fi
  check deb-purge-unit-gone test "$(systemctl show -P LoadState cgtproxy.service)" = not-found
  left=$(find /etc/systemd/system -name 'cgtproxy*.service' 2>/dev/null)
  if [ -z "$left" ]; then pass deb-purge-enable-links-gone
  else fail deb-purge-enable-links-gone "left: $(echo "$left" | tr '\n' ' ')"; fi
  check deb-purge-keeps-config test -s /etc/cgtproxy/config.json
  local status
  status=$(dpkg-query -W -f='${Status}' cgtproxy 2>/dev/null)
  if [ -z "$status" ] || [[ $status == *" not-installed" ]]; then pass deb-purge-not-installed
  else fail deb-purge-not-installed "dpkg status: $status"; fi
}
