//! `/proc/self/mountinfo`: what is mounted where. The CSI node plugin's only state (a
//! restarted plugin knows its live mounts from it), and `sealfs mount`'s checks of its
//! mount point (busy, or a dead mount to detach).

use std::path::{Path, PathBuf};

/// One mount of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
}

/// The fstype of a sealfs mount made by the CSI node plugin (kernel_mount) or mount.fuse3.
pub const FS_TYPE: &str = "fuse.sealfs";

/// Every mount of this process's namespace.
pub fn read() -> std::io::Result<Vec<Mount>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// The topmost mount at `path`, if any.
pub fn at(path: &Path) -> std::io::Result<Option<Mount>> {
    Ok(read()?.into_iter().rev().find(|m| m.mount_point == path))
}

/// Lines `ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL…] - FSTYPE SOURCE SUPER`
/// (proc(5)); a malformed line is skipped.
pub fn parse(table: &str) -> Vec<Mount> {
    table
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let mount_point = fields.nth(4)?;
            let mut rest = fields.skip_while(|f| *f != "-").skip(1);
            let fs_type = rest.next()?;
            let source = rest.next()?;
            Some(Mount {
                mount_point: PathBuf::from(unescape(mount_point)),
                fs_type: unescape(fs_type),
                source: unescape(source),
            })
        })
        .collect()
}

/// The kernel writes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                let v = d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
                out.push(v as u8);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealfs_mounts_are_found_with_escapes_and_optional_fields() {
        let t = "\
22 1 0:21 / /proc rw,nosuid shared:5 - proc proc rw
812 29 0:77 / /var/lib/kubelet/pods/a\\040b/volumes/kubernetes.io~csi/m/mount ro,nosuid,nodev shared:400 master:1 - fuse.sealfs s3://models/llama ro,user_id=0,group_id=0,default_permissions,allow_other
broken line
813 29 0:78 / /mnt/x rw - fuse.sealfs file:///srv/store rw
";
        let m = parse(t);
        assert_eq!(m.len(), 3);
        assert_eq!(
            m[1],
            Mount {
                mount_point: "/var/lib/kubelet/pods/a b/volumes/kubernetes.io~csi/m/mount".into(),
                fs_type: FS_TYPE.into(),
                source: "s3://models/llama".into(),
            }
        );
        assert_eq!(m[2].source, "file:///srv/store");
        assert_eq!(unescape("a\\134b\\011c\\"), "a\\b\tc\\");
    }

    #[test]
    fn this_process_table_has_its_root() {
        assert!(read()
            .unwrap()
            .iter()
            .any(|m| m.mount_point == Path::new("/")));
    }
}
