//! The dump of an address space records SysV shm attachments (kind, segment
//! id, the read-only/read-write attach) and saves no pages for them. Its own
//! test binary: it dumps this very process, whose mappings other tests
//! running in parallel would change underneath. Needs root.

use ckpt_agent::mm;
use ckpt_agent::sys::ipc as sys;
use ckpt_proto::image::VmaKind;

#[test]
fn dump_records_sysv_attachments_without_pages() {
    let size = 3 * 4096 + 1;
    let id = sys::shm_get(libc::IPC_PRIVATE, size, libc::IPC_CREAT | 0o600).unwrap();
    let mut rw = sys::ShmAttach::new(id, true).unwrap();
    let ro = sys::ShmAttach::new(id, false);
    // Removed now, so that the segment goes with its last detach whatever
    // happens below.
    sys::shm_ctl(id, libc::IPC_RMID).unwrap();
    let ro = ro.unwrap();
    rw.bytes_mut().unwrap().fill(0x5a);
    let rw_at = rw.bytes().as_ptr() as u64;
    let ro_at = ro.bytes().as_ptr() as u64;

    let d = mm::dump(std::process::id() as i32, 0, None, None, None, None).unwrap();
    let sysv: Vec<_> = d
        .image
        .vmas
        .iter()
        .filter(|v| v.kind == VmaKind::VmaSysvShm as i32)
        .collect();
    assert_eq!(sysv.len(), 2, "{sysv:?}");
    for v in &sysv {
        assert_eq!(v.shmid, id as u64);
        assert_eq!(v.end - v.start, 4 * 4096);
        assert_eq!(v.pgoff, 0);
        let may_write = v.vm_flags.iter().any(|f| f == "mw");
        if v.start == rw_at {
            assert!(may_write && v.prot & libc::PROT_WRITE as u32 != 0);
        } else {
            assert_eq!(v.start, ro_at);
            assert!(!may_write && v.prot & libc::PROT_WRITE as u32 == 0);
        }
        assert!(
            d.extents
                .iter()
                .all(|e| e.end <= v.start || e.start >= v.end),
            "pages of the segment at {:#x} went to the page store",
            v.start
        );
    }
    drop((rw, ro));
}
