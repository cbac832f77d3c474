//! The directory tree, built from one paginated LIST of the prefix (any depth). Sizes come
//! from the listing alone: no GET, HEAD or KMS call answers `ls -l` or `stat`.

use std::collections::BTreeMap;

use crate::object::{Listing, SealedEntry};

pub const ROOT: u64 = 1;

pub enum Node {
    Dir {
        children: BTreeMap<String, u64>,
        parent: u64,
    },
    File {
        entry: SealedEntry,
        size: u64,
        parent: u64,
    },
}

pub struct Tree {
    nodes: Vec<Node>, // index = inode - 1
}

impl Tree {
    /// Builds the tree of the sealed files under `prefix`. Files whose object size is not
    /// one a sealed file can have are left out (with a warning): they would only fail.
    pub fn build(listing: Listing, prefix: &str) -> Self {
        let mut t = Self {
            nodes: vec![Node::Dir {
                children: BTreeMap::new(),
                parent: ROOT,
            }],
        };
        t.refresh(listing, prefix);
        t
    }

    /// Applies a newer listing. A path keeps its inode number (the kernel may hold it), a
    /// changed object gets its new entry and size, new files are added, and files gone from
    /// the listing are unlinked from their directory (an open of a stale inode then re-lists
    /// and fails with ENOENT). Returns (added, changed, removed).
    pub fn refresh(&mut self, listing: Listing, prefix: &str) -> (usize, usize, usize) {
        let (mut added, mut changed) = (0, 0);
        let mut seen = std::collections::HashSet::new();
        for e in listing.sealed {
            let rel = if prefix.is_empty() {
                e.data.key.as_str()
            } else {
                match e
                    .data
                    .key
                    .strip_prefix(prefix)
                    .and_then(|r| r.strip_prefix('/'))
                {
                    Some(r) => r,
                    None => continue,
                }
            }
            .to_string();
            let Some(size) = e.plaintext_size() else {
                tracing::warn!(file = %e.data.key, size = e.data.size, "object size impossible for a sealed file; hidden");
                continue;
            };
            let mut parts: Vec<&str> = rel.split('/').filter(|p| !p.is_empty()).collect();
            let Some(name) = parts.pop() else { continue };
            let mut dir = ROOT;
            for p in parts {
                dir = self.child_dir(dir, p);
            }
            match self.lookup(dir, name) {
                Some(ino) => match &mut self.nodes[ino as usize - 1] {
                    Node::File {
                        entry, size: sz, ..
                    } => {
                        if entry.data.etag != e.data.etag
                            || entry.key_object.key != e.key_object.key
                        {
                            *entry = e.clone();
                            *sz = size;
                            changed += 1;
                        }
                        seen.insert(ino);
                    }
                    Node::Dir { .. } => {} // a name that is both a file and a directory: the directory wins
                },
                None => {
                    let ino = self.nodes.len() as u64 + 1;
                    self.nodes.push(Node::File {
                        entry: e.clone(),
                        size,
                        parent: dir,
                    });
                    self.children_mut(dir).insert(name.to_string(), ino);
                    seen.insert(ino);
                    added += 1;
                }
            }
        }
        let gone: Vec<(usize, String)> = (0..self.nodes.len())
            .flat_map(|d| match &self.nodes[d] {
                Node::Dir { children, .. } => children
                    .iter()
                    .filter(|(_, ino)| {
                        !seen.contains(*ino) && matches!(self.get(**ino), Some(Node::File { .. }))
                    })
                    .map(|(name, _)| (d, name.clone()))
                    .collect(),
                Node::File { .. } => Vec::new(),
            })
            .collect();
        for (d, name) in &gone {
            if let Node::Dir { children, .. } = &mut self.nodes[*d] {
                children.remove(name);
            }
        }
        (added, changed, gone.len())
    }

    fn child_dir(&mut self, parent: u64, name: &str) -> u64 {
        if let Some(ino) = self.lookup(parent, name) {
            if matches!(self.get(ino), Some(Node::Dir { .. })) {
                return ino;
            }
        }
        let ino = self.nodes.len() as u64 + 1;
        self.nodes.push(Node::Dir {
            children: BTreeMap::new(),
            parent,
        });
        self.children_mut(parent).insert(name.to_string(), ino);
        ino
    }

    fn children_mut(&mut self, dir: u64) -> &mut BTreeMap<String, u64> {
        match &mut self.nodes[dir as usize - 1] {
            Node::Dir { children, .. } => children,
            Node::File { .. } => unreachable!("BUG: inode {dir} is not a directory"),
        }
    }

    pub fn get(&self, ino: u64) -> Option<&Node> {
        self.nodes.get((ino as usize).checked_sub(1)?)
    }

    pub fn lookup(&self, parent: u64, name: &str) -> Option<u64> {
        match self.get(parent)? {
            Node::Dir { children, .. } => children.get(name).copied(),
            Node::File { .. } => None,
        }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Largest chunk size of any file (the cache slot size).
    pub fn max_chunk_log2(&self) -> Option<u8> {
        self.nodes
            .iter()
            .filter_map(|n| match n {
                Node::File { entry, .. } => Some(entry.chunk_log2),
                _ => None,
            })
            .max()
    }

    /// Updates a file's entry after an open found the object changed.
    pub fn set_entry(&mut self, ino: u64, new: SealedEntry, new_size: u64) {
        if let Some(Node::File { entry, size, .. }) = self.nodes.get_mut(ino as usize - 1) {
            *entry = new;
            *size = new_size;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::object::pair;
    use crate::store::ObjectInfo;

    #[test]
    fn tree_from_listing() {
        let o = |k: &str, s: u64| ObjectInfo {
            key: k.into(),
            size: s,
            etag: "e".into(),
        };
        let l = pair(vec![
            o("p/a", 48),
            o("p/a.sealfs-c14", 1),
            o("p/d/e/b", 32 + 10 + 16),
            o("p/d/e/b.sealfs-c14", 1),
            o("p/junk", 5),
            o("p/bad", 40),
            o("p/bad.sealfs-c14", 1),
        ]);
        let t = Tree::build(l, "p");
        let a = t.lookup(ROOT, "a").unwrap();
        assert!(matches!(t.get(a), Some(Node::File { size: 0, .. })));
        let d = t.lookup(ROOT, "d").unwrap();
        let e = t.lookup(d, "e").unwrap();
        let b = t.lookup(e, "b").unwrap();
        assert!(matches!(t.get(b), Some(Node::File { size: 10, .. })));
        assert_eq!(t.lookup(ROOT, "junk"), None, "unsealed objects are hidden");
        assert_eq!(t.lookup(ROOT, "bad"), None, "impossible sizes are hidden");
        assert_eq!(t.max_chunk_log2(), Some(14));
    }

    #[test]
    fn refresh_keeps_inodes_adds_and_unlinks() {
        let o = |k: &str, s: u64, e: &str| ObjectInfo {
            key: k.into(),
            size: s,
            etag: e.into(),
        };
        let mut t = Tree::build(
            pair(vec![
                o("a", 48, "1"),
                o("a.sealfs-c14", 1, "k"),
                o("d/b", 48, "1"),
                o("d/b.sealfs-c14", 1, "k"),
            ]),
            "",
        );
        let a = t.lookup(ROOT, "a").unwrap();
        let d = t.lookup(ROOT, "d").unwrap();
        let next = pair(vec![
            o("a", 32 + 5 + 16, "2"),
            o("a.sealfs-c14", 1, "k"),
            o("c", 48, "1"),
            o("c.sealfs-c14", 1, "k"),
        ]);
        assert_eq!(t.refresh(next, ""), (1, 1, 1));
        assert_eq!(t.lookup(ROOT, "a"), Some(a), "same path, same inode");
        assert!(
            matches!(t.get(a), Some(Node::File { size: 5, .. })),
            "new size after replacement"
        );
        assert!(t.lookup(ROOT, "c").is_some());
        assert_eq!(t.lookup(d, "b"), None, "removed file unlinked");
    }
}
