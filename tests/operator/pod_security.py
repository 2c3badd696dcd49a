"""The ``restricted`` Pod Security Standard, checked as the PodSecurity admission plugin does.

Every check of the baseline and restricted levels (Kubernetes 1.33, k8s.io/pod-security-admission
policy package) on a pod template: host namespaces, privileged, capabilities, hostPath and volume
types, hostPorts, AppArmor, SELinux, /proc mount, seccomp, sysctls, privilege escalation, running
as non-root and as a non-zero uid. Returns readable violations, empty when the pod is admitted.
"""

from __future__ import annotations

from typing import Any

# Baseline: capabilities a container may add; restricted allows only NET_BIND_SERVICE.
RESTRICTED_ADD = {"NET_BIND_SERVICE"}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
    "image",
}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
APPARMOR_PREFIX = "container.apparmor.security.beta.kubernetes.io/"


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        *(spec.get("initContainers") or []),
        *(spec.get("containers") or []),
        *(spec.get("ephemeralContainers") or []),
    ]


def restricted_violations(template: dict[str, Any]) -> list[str]:
    """Violations of ``restricted`` for a pod template ({metadata, spec}) or a Pod."""
    meta, spec = template.get("metadata") or {}, template.get("spec") or {}
    pod_sc = spec.get("securityContext") or {}
    containers = _containers(spec)
    problems: list[str] = []

    # --- baseline ---
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            problems.append(f"{field}=true")
    if (pod_sc.get("windowsOptions") or {}).get("hostProcess"):
        problems.append("pod hostProcess")
    for volume in spec.get("volumes") or []:
        if "hostPath" in volume:
            problems.append(f"hostPath volume {volume.get('name')}")
    for key, value in (meta.get("annotations") or {}).items():
        if key.startswith(APPARMOR_PREFIX) and not (
            value == "runtime/default" or value.startswith("localhost/")
        ):
            problems.append(f"AppArmor annotation {key}={value}")
    for where, sc in [("pod", pod_sc)] + [
        (c.get("name"), c.get("securityContext") or {}) for c in containers
    ]:
        apparmor = (sc.get("appArmorProfile") or {}).get("type")
        if apparmor not in (None, "RuntimeDefault", "Localhost"):
            problems.append(f"{where}: appArmorProfile {apparmor}")
        selinux = sc.get("seLinuxOptions") or {}
        if selinux.get("type", "") not in SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
            problems.append(f"{where}: seLinuxOptions {selinux}")
        if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
            problems.append(f"{where}: seccompProfile Unconfined")
        if sc.get("runAsUser") == 0:
            problems.append(f"{where}: runAsUser 0")
    for sysctl in pod_sc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            problems.append(f"unsafe sysctl {sysctl.get('name')}")
    for container in containers:
        name, sc = container.get("name"), container.get("securityContext") or {}
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            problems.append(f"{name}: hostProcess")
        if sc.get("procMount") not in (None, "Default"):
            problems.append(f"{name}: procMount {sc.get('procMount')}")
        for port in container.get("ports") or []:
            if port.get("hostPort"):
                problems.append(f"{name}: hostPort {port['hostPort']}")

        # --- restricted ---
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation != false")
        capabilities = sc.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            problems.append(f"{name}: capabilities.drop does not include ALL")
        added = set(capabilities.get("add") or []) - RESTRICTED_ADD
        if added:
            problems.append(f"{name}: capabilities.add {sorted(added)}")
        non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        if non_root is not True:
            problems.append(f"{name}: runAsNonRoot != true")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile not RuntimeDefault or Localhost")
    for volume in spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            problems.append(
                f"volume {volume.get('name')}: type {sorted(kinds - RESTRICTED_VOLUMES)} not allowed"
            )
    return problems
