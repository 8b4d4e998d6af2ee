# shellcheck shell=bash
# shellcheck disable=SC2154 # the caller sets the variables listed below
# The Soft-RoCE VM as a library, shared by vm-run (one VM) and the cluster runner: host
# packages, the cached kernel (with its module closure) and initramfs, the workspace build and
# test discovery, and qemu supervision. Sourced after common.sh, never run. The caller sets:
#   here       the soft-roce-setup directory     workspace  the workspace root
#   cache      the image cache (.vm)             verbose    1 to show the VM's setup steps
#   rebuild    1 to rebuild the cached image     device_tests  1 to list test harnesses
#   vm_ip      the VM's address in /etc/hosts    timeout, boot_timeout  seconds, for vm_supervise
#   mem, cpus, hugepages, accel                  the VM's size and qemu accelerator

# --- host packages ---------------------------------------------------------------------------
# Installs what booting a VM needs; sets `busybox` to a static busybox.
vm_host_packages() {
    local libdir
    libdir=$(multiarch_libdir)
    install_missing \
        qemu-system-x86_64:qemu-system-x86 busybox:busybox-static cpio:cpio gzip:gzip \
        ibv_devinfo:ibverbs-utils ib_read_lat:perftest rdma:iproute2 \
        "$libdir/libibverbs/librxe-rdmav34.so:ibverbs-providers" \
        "$libdir/librdmacm.so.1:librdmacm1" apt-get:apt jq:jq nbd-client:nbd-client
    busybox=$(command -v busybox)
    # The initramfs needs a static busybox: busybox-static replaces the dynamically linked one.
    if ldd "$busybox" >/dev/null 2>&1; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static >/dev/null ||
            die "$busybox is dynamically linked and busybox-static could not be installed"
        busybox=$(command -v busybox)
    fi
    [ -L /lib ] || die "this host does not have a merged /usr (/lib is not a symlink); the VM shares /usr only"
}

# --- kernel and initramfs (cached) -----------------------------------------------------------
# The modules the init loads, by name; their dependencies are added in load order.
boot_modules="virtio_pci 9pnet_virtio 9p"
# crc32_generic is only a soft dependency of rdma_rxe, which fails without it. nbd and zram:
# rdmem-swap's test and benchmark (swap to an NBD export, and zram as the local baseline).
rdma_modules="crc32_generic dummy virtio_net sch_netem rdma_rxe ib_uverbs rdma_ucm nbd zram"

# Prints the module names a .ko depends on, one per line (from its .modinfo "depends=").
ko_depends() {
    local deps
    deps=$(LC_ALL=C grep -a -o -m1 'depends=[A-Za-z0-9_,-]*' "$1" | head -n1 || true)
    deps=${deps#depends=}
    [ -n "$deps" ] && tr ',' '\n' <<<"$deps"
    return 0
}

# Fetches the kernel package, keeps vmlinuz and the modules we load, writes the load orders.
fetch_kernel() {
    local dest=$1 tmp pkg ko name
    tmp=$(mktemp -d)
    pkg=${RDMEM_VM_KERNEL_PKG:-}
    if [ -z "$pkg" ]; then
        (cd "$tmp" && apt-get download linux-image-amd64) >/dev/null 2>&1 || {
            as_root apt-get update -qq >/dev/null
            (cd "$tmp" && apt-get download linux-image-amd64) >/dev/null 2>&1
        } || die "cannot download linux-image-amd64 (a Debian kernel with CONFIG_RDMA_RXE=m); set RDMEM_VM_KERNEL_PKG"
        pkg=$(dpkg-deb -f "$tmp"/linux-image-amd64_*.deb Depends | grep -o 'linux-image-[0-9][^ ,]*' | head -n1)
        [ -n "$pkg" ] || die "cannot tell which kernel linux-image-amd64 depends on"
    fi
    say "fetching kernel package $pkg (once; cached under $cache)"
    (cd "$tmp" && apt-get download "$pkg") >/dev/null 2>&1 || die "cannot download $pkg"
    dpkg-deb -x "$tmp/$pkg"_*.deb "$tmp/x"
    mkdir -p "$dest.tmp/modules"
    cp "$tmp"/x/boot/vmlinuz-* "$dest.tmp/vmlinuz"
    # Index every module by its name (file names may spell _ as -), then resolve dependencies.
    declare -A path_of=() done_mods=()
    while IFS= read -r ko; do
        name=${ko##*/}
        name=${name%%.ko*}
        path_of[${name//-/_}]=$ko
    done < <(find "$tmp"/x/lib/modules -name '*.ko*')
    add_module() { # name order-file
        local n=${1//-/_} src d
        [ -n "${done_mods[$n]:-}" ] && return 0
        src=${path_of[$n]:-}
        [ -n "$src" ] || die "kernel package has no module $n (does it have CONFIG_RDMA_RXE=m?)"
        local file
        file=$(basename "$src")
        case $file in
        *.ko.xz) xz -dc "$src" >"$dest.tmp/modules/$n.ko" ;;
        *.ko.zst) zstd -qdc "$src" >"$dest.tmp/modules/$n.ko" ;;
        *.ko.gz) gzip -dc "$src" >"$dest.tmp/modules/$n.ko" ;;
        *) cp "$src" "$dest.tmp/modules/$n.ko" ;;
        esac
        done_mods[$n]=1
        for d in $(ko_depends "$dest.tmp/modules/$n.ko"); do add_module "$d" "$2"; done
        echo "$n.ko" >>"$2"
    }
    : >"$dest.tmp/modules/boot.order"
    : >"$dest.tmp/modules/rdma.order"
    for m in $boot_modules; do add_module "$m" "$dest.tmp/modules/boot.order"; done
    for m in $rdma_modules; do add_module "$m" "$dest.tmp/modules/rdma.order"; done
    echo "$pkg" >"$dest.tmp/package"
    echo "$boot_modules|$rdma_modules" >"$dest.tmp/modules.list"
    rm -rf "$tmp" "$dest"
    mv "$dest.tmp" "$dest"
}

# Builds the initramfs: busybox, the init, the modules, /etc files for libibverbs and libc.
build_initramfs() {
    local out=$1 root f
    root=$(mktemp -d)
    mkdir -p "$root"/{rdmem/bin,etc,usr,proc,sys,dev,tmp,run,root}
    cp "$busybox" "$root/rdmem/bin/busybox"
    for f in $("$busybox" --list); do
        [ "$f" = busybox ] || ln -s busybox "$root/rdmem/bin/$f"
    done
    for f in bin lib lib64 sbin; do [ -L "/$f" ] && ln -s "usr/$f" "$root/$f"; done
    cp -r "$cache/kernel/modules" "$root/rdmem/modules"
    install -m 0755 "$here/vm/init" "$root/init"
    # libibverbs finds providers through /etc/libibverbs.d; the rest serve libc and tools.
    for f in libibverbs.d rdma ld.so.cache ld.so.conf ld.so.conf.d nsswitch.conf services \
        protocols passwd group iproute2; do
        [ -e "/etc/$f" ] && cp -r "/etc/$f" "$root/etc/"
    done
    printf '127.0.0.1 localhost\n%s rdmem-vm\n' "$vm_ip" >"$root/etc/hosts"
    echo rdmem-vm >"$root/etc/hostname"
    (cd "$root" && find . | cpio -o -H newc --quiet) | gzip -1 >"$out.tmp"
    mv "$out.tmp" "$out"
    rm -rf "$root"
}

# Makes sure the cached kernel and initramfs under $cache are there and current.
vm_prepare_image() {
    mkdir -p "$cache"
    [ -f "$cache/.gitignore" ] || echo '*' >"$cache/.gitignore"
    exec 9>"$cache/lock"
    flock 9
    if [ "$rebuild" = 1 ]; then rm -rf "$cache/kernel" "$cache/initramfs.img"; fi
    # Fetched again when the modules it must carry changed.
    if [ ! -f "$cache/kernel/package" ] ||
        [ "$(cat "$cache/kernel/modules.list" 2>/dev/null)" != "$boot_modules|$rdma_modules" ]; then
        fetch_kernel "$cache/kernel"
    fi
    # Inputs of the initramfs; it is rebuilt when any of them changed.
    local key
    key=$({
        echo "format 1"
        cat "$cache/kernel/package" "$here/vm/init"
        sha256sum "$busybox" | cut -d' ' -f1
        ls -l /etc/libibverbs.d
        printf '%s\n' "$boot_modules" "$rdma_modules"
    } | sha256sum | cut -d' ' -f1)
    if [ ! -f "$cache/initramfs.img" ] || [ "$(cat "$cache/initramfs.key" 2>/dev/null)" != "$key" ]; then
        [ "$verbose" = 1 ] && say "building initramfs"
        build_initramfs "$cache/initramfs.img"
        echo "$key" >"$cache/initramfs.key"
    fi
    exec 9>&-
}

# --- workspace build -------------------------------------------------------------------------
# Builds the workspace's release binaries and examples; with `device_tests=1` also its test
# harnesses, listed in `test_binaries` (from cargo's JSON messages, parsed with jq).
test_binaries=()
vm_build_workspace() {
    [ -f "$workspace/Cargo.toml" ] || return 0
    command -v cargo >/dev/null 2>&1 || die "cargo not found; install Rust (https://rustup.rs) or pass --no-build"
    # sideway's rdma-mummy-sys builds a C stub with cmake and generates bindings with libclang.
    install_missing cmake:cmake gcc:gcc :libclang-dev
    (cd "$workspace" && cargo build --release --workspace --bins --examples --quiet) ||
        die "cargo build --release failed"
    [ "$device_tests" = 1 ] || return 0
    # Test harnesses are the artifacts built with the test profile that have an executable.
    local line json
    json=$(cd "$workspace" && cargo test --release --workspace --no-run --quiet --message-format=json) ||
        die "cargo test --release --no-run failed"
    while IFS= read -r line; do
        test_binaries+=("$line")
    done < <(jq -r 'select(.reason == "compiler-artifact" and .profile.test and .executable != null)
        | .executable' <<<"$json")
    [ "${#test_binaries[@]}" -gt 0 ] ||
        die "cargo test --release --no-run built no test binaries (run it by hand to see why)"
}

# --- what the VM runs ------------------------------------------------------------------------
# Single-quotes a word for a POSIX shell.
shell_quote() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }

# Writes the script the VM's init runs: the workspace's binaries, examples and the VM helpers
# (soft-roce-setup/vm/bin) first on PATH, then CMD; with `device_tests=1` every test binary's
# ignored tier instead, with FILTER-ARGS (e.g. `--skip cluster_`) and CMD as extra arguments.
vm_write_command() { # file [filter-args...] -- [cmd...]
    local file=$1 w
    shift
    local filter=()
    while [ $# -gt 0 ] && [ "$1" != -- ]; do
        filter+=("$1")
        shift
    done
    [ "${1-}" = -- ] && shift
    {
        # shellcheck disable=SC2016 # $PATH is expanded in the VM
        printf 'export PATH=%s:%s:%s:"$PATH"\n' "$(shell_quote "$workspace/target/release")" \
            "$(shell_quote "$workspace/target/release/examples")" "$(shell_quote "$here/vm/bin")"
        if [ "$device_tests" = 1 ]; then
            # Run every test binary's ignored (device) tier; fail if any fails.
            echo 'status=0'
            for w in "${test_binaries[@]}"; do
                printf 'echo "== %s"\n' "${w#"$workspace"/}"
                printf '%s --ignored' "$(shell_quote "$w")"
                for a in "${filter[@]}" "$@"; do printf ' %s' "$(shell_quote "$a")"; done
                echo ' || status=1'
            done
            # shellcheck disable=SC2016 # expanded in the VM
            echo 'exit "$status"'
        else
            printf 'exec'
            for w in "$@"; do printf ' %s' "$(shell_quote "$w")"; done
            echo
        fi
    } >"$file"
}

# Writes the run directory's env file, which the VM's init sources: where the workspace is, the
# directory CMD starts in (the current one when it is inside the workspace), the VM's address
# and huge pages; extra lines (`export NAME=value`) follow.
vm_write_env() { # run-dir ip [lines...]
    local run=$1 ip=$2 cwd line
    shift 2
    cwd=$(pwd)
    case $cwd/ in "$workspace"/*) ;; *) cwd=$workspace ;; esac
    {
        echo "RDMEM_WORKSPACE=$(shell_quote "$workspace")"
        echo "RDMEM_CWD=$(shell_quote "$cwd")"
        echo "RDMEM_IP=$ip"
        echo "RDMEM_HUGEPAGES=$hugepages"
        echo "VERBOSE=$verbose"
        for line in "$@"; do echo "$line"; done
    } >"$run/env"
}

# Sets `qemu_args` for a VM whose run directory is RUN: TCG (or --accel), `mem` MiB and `cpus`
# vCPUs, the cached kernel and initramfs, /usr (read-only), the workspace and RUN over 9p. CMD
# talks on the first serial port (stdout); the kernel logs to the second one (RUN/kernel.log),
# or to the first one as well with verbose=1. NET-ARGS give the network (`-nic none` for one
# VM).
vm_qemu_args() { # run-dir net-args...
    local run=$1 append kernel_log
    shift
    append="panic=-1 rdinit=/init console=ttyS1"
    kernel_log=file:$run/kernel.log
    if [ "$verbose" = 1 ]; then
        append="panic=-1 rdinit=/init console=ttyS0"
        kernel_log=null
    fi
    # shellcheck disable=SC2034 # the caller passes it to vm_start
    qemu_args=(
        -accel "$accel" -cpu max -m "$mem" -smp "$cpus"
        -display none -monitor none -serial stdio -serial "$kernel_log" -no-reboot "$@"
        -kernel "$cache/kernel/vmlinuz" -initrd "$cache/initramfs.img" -append "$append"
        -virtfs "local,path=/usr,mount_tag=usr,security_model=none,readonly=on"
        -virtfs "local,path=$workspace,mount_tag=ws,security_model=none"
        -virtfs "local,path=$run,mount_tag=run,security_model=none"
        -pidfile "$run/qemu.pid"
    )
}

# --- qemu supervision -----------------------------------------------------------------------
# VMs started and not yet reaped, and their run directories (same index).
vm_pids=()
vm_dirs=()

# Runs qemu with the arguments given, in the background, its console on stdout (each line
# prefixed with LABEL when it is not empty); appends it to `vm_pids` and `vm_dirs`.
vm_start() { # run-dir label qemu-args...
    local run=$1 label=$2
    shift 2
    if [ -n "$label" ]; then
        qemu-system-x86_64 "$@" </dev/null 2>"$run/qemu.log" > >(sed -u "s/^/$label /") &
    else
        qemu-system-x86_64 "$@" </dev/null 2>"$run/qemu.log" &
    fi
    vm_pids+=("$!")
    vm_dirs+=("$run")
}

# Waits until every VM in `vm_pids` has ended, counting from SECONDS=0: carries out kill
# requests (rdmem-vm-kill writes the victim's index to its own run directory's kill-request;
# the victim gets SIGKILL, a machine death), and kills every VM when one has not started its
# command (no started file) within `boot_timeout` seconds or they run past `timeout` (0:
# never). Sets `verdict` ("", "timeout" or "boot:K"), `vm_killed` (indexes killed on
# request) and `vm_status` (qemu's exit statuses), and reaps them all (`vm_pids` is emptied).
vm_supervise() {
    local k alive req victim
    verdict=
    vm_killed=()
    vm_status=()
    while :; do
        alive=0
        for k in "${!vm_pids[@]}"; do
            if [ -n "${vm_pids[k]}" ] && kill -0 "${vm_pids[k]}" 2>/dev/null; then
                alive=$((alive + 1))
                if [ ! -e "${vm_dirs[k]}/started" ] && [ "$SECONDS" -gt "$boot_timeout" ]; then
                    verdict="boot:$k"
                fi
            fi
            req=${vm_dirs[k]}/kill-request
            [ -f "$req" ] || continue
            victim=$(cat "$req")
            if [[ $victim =~ ^[0-9]+$ ]] && [ "$victim" -lt "${#vm_pids[@]}" ]; then
                say "node $k asked to kill node $victim: killing its VM"
                if [ -n "${vm_pids[victim]}" ]; then
                    kill -9 "${vm_pids[victim]}" 2>/dev/null || true
                    wait "${vm_pids[victim]}" 2>/dev/null || true
                fi
                vm_pids[victim]=
                vm_killed+=("$victim")
            fi
            rm -f "$req"
        done
        [ "$alive" -gt 0 ] || break
        if [ "$timeout" -gt 0 ] && [ "$SECONDS" -gt "$timeout" ]; then verdict=timeout; fi
        [ -z "$verdict" ] || break
        sleep 0.2
    done
    for k in "${!vm_pids[@]}"; do
        [ -n "${vm_pids[k]}" ] || continue
        [ -n "$verdict" ] && kill -9 "${vm_pids[k]}" 2>/dev/null
        vm_status[k]=0
        wait "${vm_pids[k]}" 2>/dev/null || vm_status[k]=$?
    done
    vm_pids=()
}

# Dies (124) when the VMs ran past the timeout, or (125) when VM K did not start its command.
vm_die_verdict() {
    local k
    case $verdict in
    timeout) DIE_STATUS=124 die "ran past --timeout ${timeout}s; the VMs were killed" ;;
    boot:*)
        k=${verdict#boot:}
        tail -n 20 "${vm_dirs[k]}/kernel.log" >&2 2>/dev/null || true
        die "node $k did not start CMD within ${boot_timeout}s (--boot-timeout); rerun with --verbose to see the boot" ;;
    esac
}

# Dies (125) with what is known of VM K, which ended without its command's status.
vm_die_unfinished() { # k
    local dir=${vm_dirs[$1]}
    [ -f "$dir/setup-error" ] && die "node $1: the VM's setup failed: $(cat "$dir/setup-error")"
    tail -n 20 "$dir/qemu.log" "$dir/kernel.log" >&2 2>/dev/null || true
    die "node $1: the VM stopped (qemu exit status ${vm_status[$1]-unknown}) before CMD finished; rerun with --verbose"
}
