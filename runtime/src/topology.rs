//! Node topology: the CPUs this process may use, how they group into cores, packages and
//! NUMA nodes, the machine's memory and its GPUs.
//!
//! The node agent calls [`detect`] once at start-up. With the cargo feature `hwloc` the
//! topology comes from hwloc (through the `hwlocality` crate, hwloc >= 2.8); on any hwloc
//! error, or without the feature, it comes from sysfs and `sched_getaffinity`
//! ([`detect_sysfs`]), so a machine without hwloc still works. Both sources fill the same
//! [`Topology`] in the same order, so they compare equal field by field on the same machine
//! (except [`Topology::source`]).
//!
//! Nothing here panics on a missing or unreadable file (containers often hide parts of
//! `/sys`): detection degrades to what it can read, down to "every CPU of the affinity mask
//! is its own core on one NUMA node".

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

/// Where a [`Topology`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// The hwloc library (cargo feature `hwloc`).
    Hwloc,
    /// Linux sysfs/procfs and `sched_getaffinity`.
    Sysfs,
}

/// One NUMA node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumaNode {
    /// The OS index of the node (`N` of `/sys/devices/system/node/nodeN`).
    pub os_index: usize,
    /// The CPUs of this node that this process may use (sorted; empty for a memory-only
    /// node or when none of its CPUs is in the affinity mask).
    pub cpus: Vec<usize>,
    /// The node's local memory in bytes (0 when unknown).
    pub memory: u64,
}

/// One GPU, found as a PCI device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    /// `"nvidia"`, `"amd"` or `"intel"` (see [`gpu_vendor`]).
    pub vendor: String,
    /// PCI bus id, `domain:bus:device.function` in lower-case hex, e.g. `"0000:3b:00.0"`.
    pub pci_bus_id: String,
    /// Index among the GPUs of the same vendor in PCI bus id order: the index that
    /// `CUDA_VISIBLE_DEVICES` (with `CUDA_DEVICE_ORDER=PCI_BUS_ID`), `ROCR_VISIBLE_DEVICES`
    /// and `ZE_AFFINITY_MASK` use on a node without device filtering.
    pub os_index: usize,
}

/// The topology of this node as seen by this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Where the data came from.
    pub source: Source,
    /// Logical CPUs (PU OS indexes) this process may use: the machine's CPUs intersected
    /// with `sched_getaffinity` (sorted, never empty on a working system).
    pub cpus: Vec<usize>,
    /// The CPUs of [`Topology::cpus`] grouped by physical core (hyper-thread siblings
    /// together): each group sorted, groups sorted by their first CPU; their union is
    /// exactly [`Topology::cpus`].
    pub cores: Vec<Vec<usize>>,
    /// NUMA nodes, sorted by OS index (at least one when `cpus` is non-empty).
    pub numa_nodes: Vec<NumaNode>,
    /// Total physical memory in bytes (`MemTotal` of `/proc/meminfo`, the figure `free` and
    /// `psutil` report; falls back to the sum of the NUMA nodes' memory; 0 when unknown).
    pub physical_mem: u64,
    /// Number of processor packages (sockets) holding at least one of [`Topology::cpus`].
    pub packages: usize,
    /// GPUs, sorted by PCI bus id.
    pub gpus: Vec<Gpu>,
}

impl Topology {
    /// Number of usable logical CPUs (`cpus.len()`).
    pub fn num_cpus(&self) -> usize {
        self.cpus.len()
    }

    /// Number of physical cores with at least one usable CPU (`cores.len()`).
    pub fn num_cores(&self) -> usize {
        self.cores.len()
    }
}

/// Detect the node topology: from hwloc when built with the `hwloc` feature and hwloc
/// loads, otherwise (or on any hwloc error) from sysfs ([`detect_sysfs`]). Never panics.
pub fn detect() -> Topology {
    #[cfg(feature = "hwloc")]
    {
        // hwlocality asserts on a few "cannot happen" hwloc answers; a panic there must not
        // take the agent down, so it is treated like any other hwloc failure.
        if let Ok(Ok(topo)) = std::panic::catch_unwind(|| hw::detect(false)) {
            return topo;
        }
    }
    detect_sysfs()
}

/// Detect the node topology from Linux sysfs/procfs and `sched_getaffinity` only.
///
/// Reads `sched_getaffinity` (else `/sys/devices/system/cpu/online`, else
/// `available_parallelism`), `/sys/devices/system/cpu/cpuN/topology/{core_cpus_list,
/// thread_siblings_list, core_id, physical_package_id}`, `/sys/devices/system/node/nodeN/
/// {cpulist, meminfo}`, `/proc/meminfo` and `/sys/bus/pci/devices/*/{vendor, class}`; any of
/// them may be missing. Never panics.
pub fn detect_sysfs() -> Topology {
    let cpus = affinity_cpus();
    let cpu_dir = Path::new("/sys/devices/system/cpu");

    // Cores: group by the sibling list of each CPU (the kernel's own "same core" answer);
    // without it by (package, core id); without that each CPU is a core of its own.
    let mut cores: BTreeMap<CoreKey, Vec<usize>> = BTreeMap::new();
    let mut packages: Vec<i64> = Vec::new();
    for &cpu in &cpus {
        let topo = cpu_dir.join(format!("cpu{cpu}/topology"));
        let package = read_trimmed(&topo.join("physical_package_id")).and_then(|s| s.parse().ok());
        if let Some(p) = package {
            if !packages.contains(&p) {
                packages.push(p);
            }
        }
        let siblings = read_trimmed(&topo.join("core_cpus_list"))
            .or_else(|| read_trimmed(&topo.join("thread_siblings_list")))
            .map(|s| parse_cpulist(&s))
            .filter(|s| s.contains(&cpu));
        let key = match siblings {
            Some(s) => CoreKey::Siblings(s[0]),
            None => {
                let core_id = read_trimmed(&topo.join("core_id")).and_then(|s| s.parse().ok());
                match (package, core_id) {
                    (Some(p), Some(c)) => CoreKey::Ids(p, c),
                    _ => CoreKey::Alone(cpu),
                }
            }
        };
        cores.entry(key).or_default().push(cpu);
    }
    let packages = if packages.is_empty() {
        usize::from(!cpus.is_empty())
    } else {
        packages.len()
    };

    // NUMA nodes.
    let mut numa_nodes = Vec::new();
    if let Ok(entries) = fs::read_dir("/sys/devices/system/node") {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(index) = name.to_str().and_then(|n| n.strip_prefix("node")) else {
                continue;
            };
            let Ok(os_index) = index.parse::<usize>() else {
                continue;
            };
            let node_cpus = read_trimmed(&entry.path().join("cpulist"))
                .map(|s| parse_cpulist(&s))
                .unwrap_or_default();
            let memory = fs::read_to_string(entry.path().join("meminfo"))
                .ok()
                .and_then(|s| meminfo_total(&s))
                .unwrap_or(0);
            numa_nodes.push(NumaNode {
                os_index,
                cpus: intersect(&node_cpus, &cpus),
                memory,
            });
        }
    }

    let physical_mem = proc_meminfo_total().unwrap_or(0);
    if numa_nodes.is_empty() {
        // Kernel without NUMA (or /sys hidden): one node with everything, as hwloc does.
        numa_nodes.push(NumaNode {
            os_index: 0,
            cpus: cpus.clone(),
            memory: physical_mem,
        });
    }

    finish(Topology {
        source: Source::Sysfs,
        cpus,
        cores: cores.into_values().collect(),
        numa_nodes,
        physical_mem,
        packages,
        gpus: gpus_sysfs(),
    })
}

/// Map a PCI device's vendor id and class id to a GPU vendor name.
///
/// `class_id` is the 16-bit base class and subclass (`0x0300`; sysfs `class` holds 24 bits
/// with the programming interface in the low byte: shift it right by 8). GPUs are display
/// controllers: VGA `0x0300` and 3D `0x0302` for every vendor; also "other display
/// controller" `0x0380` for AMD (Instinct MI100/MI200) and Intel (Data Center GPU Max), and
/// "processing accelerator" `0x1200` for AMD (Instinct MI300). Vendors: `0x10de` nvidia,
/// `0x1002` amd, `0x8086` intel. Anything else is not a GPU (`None`).
pub fn gpu_vendor(vendor_id: u16, class_id: u16) -> Option<&'static str> {
    match (vendor_id, class_id) {
        (0x10de, 0x0300 | 0x0302) => Some("nvidia"),
        (0x1002, 0x0300 | 0x0302 | 0x0380 | 0x1200) => Some("amd"),
        (0x8086, 0x0300 | 0x0302 | 0x0380) => Some("intel"),
        _ => None,
    }
}

/// How CPUs are grouped into cores when reading sysfs (ordering only matters for grouping).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum CoreKey {
    /// First CPU of the core's sibling list.
    Siblings(usize),
    /// (physical_package_id, core_id).
    Ids(i64, i64),
    /// Nothing known: the CPU alone.
    Alone(usize),
}

/// Sort every list into the documented order and number GPUs per vendor.
fn finish(mut t: Topology) -> Topology {
    t.cpus.sort_unstable();
    t.cpus.dedup();
    for core in &mut t.cores {
        core.sort_unstable();
        core.dedup();
    }
    t.cores.retain(|c| !c.is_empty());
    t.cores.sort();
    for node in &mut t.numa_nodes {
        node.cpus.sort_unstable();
        node.cpus.dedup();
    }
    t.numa_nodes.sort_by_key(|n| n.os_index);
    if t.physical_mem == 0 {
        t.physical_mem = t.numa_nodes.iter().map(|n| n.memory).sum();
    }
    t.gpus.sort_by(|a, b| a.pci_bus_id.cmp(&b.pci_bus_id));
    let mut per_vendor: BTreeMap<String, usize> = BTreeMap::new();
    for gpu in &mut t.gpus {
        let next = per_vendor.entry(gpu.vendor.clone()).or_insert(0);
        gpu.os_index = *next;
        *next += 1;
    }
    t
}

/// The CPUs this thread may run on, sorted.
fn affinity_cpus() -> Vec<usize> {
    if let Some(cpus) = sched_affinity() {
        if !cpus.is_empty() {
            return cpus;
        }
    }
    if let Some(cpus) =
        read_trimmed(Path::new("/sys/devices/system/cpu/online")).map(|s| parse_cpulist(&s))
    {
        if !cpus.is_empty() {
            return cpus;
        }
    }
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    (0..n).collect()
}

/// `sched_getaffinity(0)` as a sorted list (`None` on error, e.g. more CPUs than the
/// fixed-size mask holds).
fn sched_affinity() -> Option<Vec<usize>> {
    use nix::sched::{sched_getaffinity, CpuSet};
    use nix::unistd::Pid;
    let set = sched_getaffinity(Pid::from_raw(0)).ok()?;
    Some(
        (0..CpuSet::count())
            .filter(|&i| set.is_set(i).unwrap_or(false))
            .collect(),
    )
}

/// `MemTotal` of `/proc/meminfo` in bytes.
fn proc_meminfo_total() -> Option<u64> {
    meminfo_total(&fs::read_to_string("/proc/meminfo").ok()?)
}

/// The `MemTotal:` line of a `/proc/meminfo` or `nodeN/meminfo` text ("Node 0 MemTotal:
/// 6252320 kB"), in bytes.
fn meminfo_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.contains("MemTotal:"))?;
    let rest = line.split("MemTotal:").nth(1)?;
    let mut words = rest.split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    let scale = match words.next() {
        Some("kB") | Some("KB") | Some("kb") => 1024,
        Some("MB") => 1024 * 1024,
        Some("GB") => 1024 * 1024 * 1024,
        None => 1,
        Some(_) => 1024,
    };
    value.checked_mul(scale)
}

/// Parse a kernel CPU list ("0-3,8,10-11", also the "a-b:stride/group" form). Malformed
/// parts are skipped. Sorted, deduplicated.
fn parse_cpulist(s: &str) -> Vec<usize> {
    let mut out = Vec::new();
    for part in s.trim().split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (range, stride) = match part.split_once(':') {
            Some((r, st)) => (r, Some(st)),
            None => (part, None),
        };
        let (lo, hi) = match range.split_once('-') {
            Some((a, b)) => match (a.trim().parse::<usize>(), b.trim().parse::<usize>()) {
                (Ok(a), Ok(b)) if a <= b => (a, b),
                _ => continue,
            },
            None => match range.parse::<usize>() {
                Ok(a) => (a, a),
                Err(_) => continue,
            },
        };
        // Guard against absurd input rather than allocating without bound.
        if hi - lo > 1 << 20 {
            continue;
        }
        match stride {
            None => out.extend(lo..=hi),
            Some(st) => {
                let (used, group) = match st.split_once('/') {
                    Some((u, g)) => (u.parse::<usize>().ok(), g.parse::<usize>().ok()),
                    None => (None, None),
                };
                let (Some(used), Some(group)) = (used, group) else {
                    continue;
                };
                if group == 0 {
                    continue;
                }
                out.extend((lo..=hi).filter(|c| (c - lo) % group < used));
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Elements of sorted `a` that are in sorted `b`.
fn intersect(a: &[usize], b: &[usize]) -> Vec<usize> {
    a.iter()
        .copied()
        .filter(|x| b.binary_search(x).is_ok())
        .collect()
}

/// A small sysfs file's content without surrounding whitespace.
fn read_trimmed(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}

/// A sysfs hex value such as `0x10de` or `0x030200`.
fn parse_hex(s: &str) -> Option<u32> {
    let s = s.trim();
    u32::from_str_radix(
        s.strip_prefix("0x")
            .or_else(|| s.strip_prefix("0X"))
            .unwrap_or(s),
        16,
    )
    .ok()
}

/// GPUs from `/sys/bus/pci/devices/*/{vendor,class}` (unsorted, `os_index` 0: see
/// [`finish`]).
fn gpus_sysfs() -> Vec<Gpu> {
    let mut gpus = Vec::new();
    let Ok(entries) = fs::read_dir("/sys/bus/pci/devices") else {
        return gpus;
    };
    for entry in entries.flatten() {
        let Some(bus_id) = entry.file_name().to_str().map(str::to_ascii_lowercase) else {
            continue;
        };
        let path = entry.path();
        let vendor = read_trimmed(&path.join("vendor")).and_then(|s| parse_hex(&s));
        let class = read_trimmed(&path.join("class")).and_then(|s| parse_hex(&s));
        let (Some(vendor), Some(class)) = (vendor, class) else {
            continue;
        };
        let (Ok(vendor), Ok(class)) = (u16::try_from(vendor), u16::try_from(class >> 8)) else {
            continue;
        };
        if let Some(name) = gpu_vendor(vendor, class) {
            gpus.push(Gpu {
                vendor: name.to_owned(),
                pci_bus_id: bus_id,
                os_index: 0,
            });
        }
    }
    gpus
}

/// Detection through hwloc (`hwlocality`).
#[cfg(feature = "hwloc")]
mod hw {
    use super::{
        affinity_cpus, finish, gpu_vendor, gpus_sysfs, proc_meminfo_total, Gpu, NumaNode, Source,
        Topology,
    };
    use hwlocality::object::attributes::ObjectAttributes;
    use hwlocality::object::types::ObjectType;
    use hwlocality::object::TopologyObject;
    use hwlocality::topology::builder::TypeFilter;

    /// The usable PU OS indexes of an object's cpuset.
    fn pus(obj: &TopologyObject, allowed: &[usize]) -> Vec<usize> {
        match obj.cpuset() {
            Some(set) => set
                .iter_set()
                .map(usize::from)
                .filter(|c| allowed.binary_search(c).is_ok())
                .collect(),
            None => Vec::new(),
        }
    }

    /// Load the topology with hwloc. With `with_io`, GPUs come from hwloc's PCI devices;
    /// without, hwloc skips I/O discovery and GPUs come from sysfs (much faster start-up).
    pub(super) fn detect(with_io: bool) -> Result<Topology, String> {
        let mut builder = hwlocality::Topology::builder();
        if with_io {
            builder = builder
                .with_type_filter(ObjectType::PCIDevice, TypeFilter::KeepAll)
                .map_err(|e| e.to_string())?;
        }
        let topo = builder.build().map_err(|e| e.to_string())?;

        // The machine's PUs (hwloc already drops those outside the cgroup) intersected with
        // this thread's affinity.
        let mut machine: Vec<usize> = topo
            .objects_with_type(ObjectType::PU)
            .filter_map(|pu| pu.os_index())
            .collect();
        machine.sort_unstable();
        let affinity = affinity_cpus();
        let cpus = super::intersect(&machine, &affinity);
        if cpus.is_empty() {
            return Err("hwloc reports none of this process's CPUs".into());
        }

        let mut cores: Vec<Vec<usize>> = topo
            .objects_with_type(ObjectType::Core)
            .map(|core| pus(core, &cpus))
            .filter(|c| !c.is_empty())
            .collect();
        // A PU outside any Core object (hwloc may not know cores on some platforms) is a
        // core of its own.
        let covered: Vec<usize> = cores.iter().flatten().copied().collect();
        cores.extend(
            cpus.iter()
                .filter(|c| !covered.contains(c))
                .map(|&c| vec![c]),
        );

        let numa_nodes: Vec<NumaNode> = topo
            .objects_with_type(ObjectType::NUMANode)
            .map(|node| NumaNode {
                os_index: node.os_index().unwrap_or(0),
                cpus: pus(node, &cpus),
                memory: match node.attributes() {
                    Some(ObjectAttributes::NUMANode(a)) => a.local_memory().map_or(0, |m| m.get()),
                    _ => 0,
                },
            })
            .collect();
        if numa_nodes.is_empty() {
            return Err("hwloc reports no NUMA node".into());
        }

        let packages = topo
            .objects_with_type(ObjectType::Package)
            .filter(|p| !pus(p, &cpus).is_empty())
            .count();

        let gpus = if with_io {
            topo.pci_devices()
                .filter_map(|dev| match dev.attributes() {
                    Some(ObjectAttributes::PCIDevice(a)) => gpu_vendor(a.vendor_id(), a.class_id())
                        .map(|v| Gpu {
                            vendor: v.to_owned(),
                            pci_bus_id: format!(
                                "{:04x}:{:02x}:{:02x}.{:x}",
                                a.domain(),
                                a.bus_id(),
                                a.bus_device(),
                                a.function()
                            ),
                            os_index: 0,
                        }),
                    _ => None,
                })
                .collect()
        } else {
            gpus_sysfs()
        };

        Ok(finish(Topology {
            source: Source::Hwloc,
            cpus: cpus.clone(),
            cores,
            numa_nodes,
            physical_mem: proc_meminfo_total().unwrap_or_else(|| topo.root_object().total_memory()),
            packages: packages.max(1),
            gpus,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn sysfs_cpus_match_affinity() {
        let t = detect_sysfs();
        assert_eq!(t.source, Source::Sysfs);
        let affinity = sched_affinity().expect("sched_getaffinity");
        assert_eq!(t.cpus, affinity);
        assert!(!t.cpus.is_empty());
    }

    #[test]
    fn sysfs_cores_partition_cpus() {
        let t = detect_sysfs();
        assert!(!t.cores.is_empty());
        assert!(t.cores.iter().all(|c| !c.is_empty()));
        let mut union: Vec<usize> = t.cores.iter().flatten().copied().collect();
        let n = union.len();
        union.sort_unstable();
        union.dedup();
        assert_eq!(union.len(), n, "a CPU is in two cores: {:?}", t.cores);
        assert_eq!(union, t.cpus);
        assert!(t.packages >= 1);
    }

    #[test]
    fn sysfs_memory_and_numa() {
        let t = detect_sysfs();
        let text = fs::read_to_string("/proc/meminfo").unwrap();
        let kb: u64 = text
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap()
            .parse()
            .unwrap();
        assert!(t.physical_mem > 0);
        assert_eq!(t.physical_mem, kb * 1024);
        assert!(!t.numa_nodes.is_empty());
        let mut numa_cpus: Vec<usize> = t.numa_nodes.iter().flat_map(|n| n.cpus.clone()).collect();
        numa_cpus.sort_unstable();
        assert_eq!(numa_cpus, t.cpus);
    }

    #[test]
    fn detect_gives_a_consistent_topology() {
        let t = detect();
        assert_eq!(t.cpus, detect_sysfs().cpus);
        assert_eq!(t.cores.iter().map(Vec::len).sum::<usize>(), t.num_cpus());
        #[cfg(feature = "hwloc")]
        assert_eq!(t.source, Source::Hwloc);
        #[cfg(not(feature = "hwloc"))]
        assert_eq!(t.source, Source::Sysfs);
    }

    #[test]
    fn gpu_vendor_mapping() {
        assert_eq!(gpu_vendor(0x10de, 0x0300), Some("nvidia"));
        assert_eq!(gpu_vendor(0x10de, 0x0302), Some("nvidia"));
        assert_eq!(gpu_vendor(0x10de, 0x0c03), None); // NVIDIA USB controller on a GPU card
        assert_eq!(gpu_vendor(0x10de, 0x0403), None); // NVIDIA HD audio
        assert_eq!(gpu_vendor(0x1002, 0x0300), Some("amd"));
        assert_eq!(gpu_vendor(0x1002, 0x0380), Some("amd"));
        assert_eq!(gpu_vendor(0x1002, 0x1200), Some("amd"));
        assert_eq!(gpu_vendor(0x8086, 0x0300), Some("intel"));
        assert_eq!(gpu_vendor(0x8086, 0x0302), Some("intel"));
        assert_eq!(gpu_vendor(0x8086, 0x0380), Some("intel"));
        assert_eq!(gpu_vendor(0x8086, 0x0600), None); // host bridge
        assert_eq!(gpu_vendor(0x8086, 0x1200), None);
        assert_eq!(gpu_vendor(0x1a03, 0x0300), None); // ASPEED BMC VGA
        assert_eq!(gpu_vendor(0x1af4, 0x0200), None); // virtio net
    }

    #[test]
    fn gpus_numbered_per_vendor_in_bus_order() {
        let gpu = |v: &str, b: &str| Gpu {
            vendor: v.into(),
            pci_bus_id: b.into(),
            os_index: 99,
        };
        let t = finish(Topology {
            source: Source::Sysfs,
            cpus: vec![1, 0],
            cores: vec![vec![1], vec![0]],
            numa_nodes: vec![NumaNode {
                os_index: 0,
                cpus: vec![0, 1],
                memory: 5,
            }],
            physical_mem: 0,
            packages: 1,
            gpus: vec![
                gpu("nvidia", "0000:b1:00.0"),
                gpu("amd", "0000:05:00.0"),
                gpu("nvidia", "0000:3b:00.0"),
            ],
        });
        assert_eq!(t.cpus, vec![0, 1]);
        assert_eq!(t.cores, vec![vec![0], vec![1]]);
        assert_eq!(t.physical_mem, 5);
        let got: Vec<(&str, &str, usize)> = t
            .gpus
            .iter()
            .map(|g| (g.vendor.as_str(), g.pci_bus_id.as_str(), g.os_index))
            .collect();
        assert_eq!(
            got,
            vec![
                ("amd", "0000:05:00.0", 0),
                ("nvidia", "0000:3b:00.0", 0),
                ("nvidia", "0000:b1:00.0", 1)
            ]
        );
    }

    #[test]
    fn cpulist_parsing() {
        assert_eq!(parse_cpulist("0-3,8,10-11\n"), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(parse_cpulist(""), Vec::<usize>::new());
        assert_eq!(parse_cpulist("5"), vec![5]);
        assert_eq!(parse_cpulist("0-7:2/4"), vec![0, 1, 4, 5]);
        assert_eq!(parse_cpulist("3-1,x,2"), vec![2]);
        assert_eq!(parse_cpulist("0-1,1-2"), vec![0, 1, 2]);
    }

    #[test]
    fn meminfo_parsing() {
        assert_eq!(
            meminfo_total("MemTotal:       24683656 kB\nMemFree: 1 kB\n"),
            Some(24683656 * 1024)
        );
        assert_eq!(
            meminfo_total("Node 0 MemTotal:        6252320 kB\n"),
            Some(6252320 * 1024)
        );
        assert_eq!(meminfo_total("MemFree: 1 kB\n"), None);
        assert_eq!(meminfo_total(""), None);
    }

    #[test]
    fn hex_parsing() {
        assert_eq!(parse_hex("0x10de\n"), Some(0x10de));
        assert_eq!(parse_hex("0x030200"), Some(0x030200));
        assert_eq!(parse_hex("zz"), None);
    }

    #[cfg(feature = "hwloc")]
    #[test]
    fn hwloc_agrees_with_sysfs() {
        let s = detect_sysfs();
        for with_io in [false, true] {
            let h = hw::detect(with_io).expect("hwloc topology");
            assert_eq!(h.source, Source::Hwloc);
            assert_eq!(h.cpus, s.cpus);
            assert_eq!(h.cores, s.cores);
            assert_eq!(h.numa_nodes.len(), s.numa_nodes.len());
            let h_nodes: Vec<(usize, &Vec<usize>)> =
                h.numa_nodes.iter().map(|n| (n.os_index, &n.cpus)).collect();
            let s_nodes: Vec<(usize, &Vec<usize>)> =
                s.numa_nodes.iter().map(|n| (n.os_index, &n.cpus)).collect();
            assert_eq!(h_nodes, s_nodes);
            assert_eq!(h.packages, s.packages);
            assert_eq!(h.physical_mem, s.physical_mem);
            assert_eq!(h.gpus, s.gpus);
        }
        assert_eq!(detect().source, Source::Hwloc);
    }

    /// Start-up cost of each way of detecting (run with `--nocapture` to see it).
    #[test]
    fn detection_timing() {
        fn time(label: &str, f: impl Fn() -> Topology) {
            let start = Instant::now();
            let _ = f(); // the first call also warms the page cache / dynamic loader
            println!("topology: {label}: first call {:?}", start.elapsed());
            let runs = 20;
            let start = Instant::now();
            for _ in 0..runs {
                std::hint::black_box(f());
            }
            let per = start.elapsed() / runs;
            println!("topology: {label}: {per:?} per call (mean of {runs})");
        }
        time("detect_sysfs", detect_sysfs);
        #[cfg(feature = "hwloc")]
        {
            time("hwloc without I/O + sysfs GPUs", || {
                hw::detect(false).unwrap()
            });
            time("hwloc with PCI devices", || hw::detect(true).unwrap());
        }
        time("detect()", detect);
    }
}
