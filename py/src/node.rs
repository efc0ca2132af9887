//! This node's hardware, as the runtime's topology detection sees it.

use pyo3::prelude::*;
use pyo3::types::PyDict;

/// This node's topology as a dict: `source` ("hwloc" or "sysfs"), `cpus` (usable logical
/// CPUs), `cores` (lists of CPUs), `numa_nodes` ([(os_index, cpus, memory bytes)]),
/// `physical_mem`, `packages`, `gpus` ([(vendor, pci_bus_id, index)]).
#[pyfunction]
pub(crate) fn topology(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    use dragon_runtime::topology::{detect, Source};
    let t = py.detach(detect);
    let d = PyDict::new(py);
    d.set_item(
        "source",
        match t.source {
            Source::Hwloc => "hwloc",
            Source::Sysfs => "sysfs",
        },
    )?;
    d.set_item("cpus", t.cpus.clone())?;
    d.set_item("cores", t.cores.clone())?;
    let numa: Vec<(usize, Vec<usize>, u64)> = t
        .numa_nodes
        .iter()
        .map(|n| (n.os_index, n.cpus.clone(), n.memory))
        .collect();
    d.set_item("numa_nodes", numa)?;
    d.set_item("physical_mem", t.physical_mem)?;
    d.set_item("packages", t.packages)?;
    let gpus: Vec<(String, String, usize)> = t
        .gpus
        .iter()
        .map(|g| (g.vendor.clone(), g.pci_bus_id.clone(), g.os_index))
        .collect();
    d.set_item("gpus", gpus)?;
    Ok(d)
}
