//! The directory tree, built from one paginated LIST of the prefix (any depth). Sizes come
//! from the listing alone: no GET, HEAD or KMS call answers `ls -l` or `stat`.
//!
//! An inode number names one *version* of a file. A replaced object gets a new inode, so
//! the kernel's page cache of the old version (kept across opens with `FOPEN_KEEP_CACHE`)
//! can never be served to an open of the new one; the old inode is retired: unlinked, still
//! answering `getattr` for handles open on it, refused by `open` with ESTALE (the kernel then
//! looks the name up again and finds the new inode), and freed when the kernel forgets it
//! or when more than [`MAX_RETIRED`] are waiting.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use crate::format::naming::escaped;
use crate::object::{Listing, SealedEntry};

pub const ROOT: u64 = 1;

/// Retired inodes kept for the kernel at most; the oldest are freed beyond this.
pub const MAX_RETIRED: usize = 4096;

/// Refused entries logged per listing at most (a hostile listing may hold millions).
const MAX_LOGGED: usize = 16;

#[derive(Clone, serde::Serialize, serde::Deserialize)]
#[cfg_attr(test, derive(Debug))]
pub enum Node {
    Dir {
        children: BTreeMap<String, u64>,
        parent: u64,
        name: String,
    },
    File {
        entry: SealedEntry,
        size: u64,
        parent: u64,
        name: String,
        /// The header MAC of the version this inode's first open authenticated: the
        /// version the inode stands for from then on, whatever ETags the store sends
        /// (it commits to the header and the DEK, so two versions never share it).
        identity: Option<[u8; 32]>,
    },
}

pub struct Tree {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    /// Unlinked inodes the kernel may still hold, oldest first.
    retired: VecDeque<u64>,
    retired_set: HashSet<u64>,
    /// Files sealed with larger chunks are hidden (they would not fit a cache slot).
    max_chunk_log2: u8,
    /// Model manifests in the listing, by model root: hidden, consulted by `open`.
    manifests: HashMap<String, SealedEntry>,
    /// Raised by every change a successor must see (numbers given out or freed, a version's
    /// identity recorded): the mount writes its state when this moved.
    changes: u64,
}

/// A tree as a successor daemon takes it over (fuse/handover.rs): every node the kernel may
/// still name, under the same numbers. Names, sizes, ETags and header MACs: nothing secret.
#[derive(serde::Serialize, serde::Deserialize)]
#[cfg_attr(test, derive(Debug))]
pub struct TreeState {
    nodes: Vec<(u64, Node)>,
    next_ino: u64,
    /// Oldest first.
    retired: Vec<u64>,
}

/// The most nodes a taken-over tree may hold (a listing's own bound is far below).
const MAX_STATE_NODES: usize = 16 << 20;

/// What [`Tree::refresh`] changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Changes {
    pub added: usize,
    /// Paths whose object was replaced: each now has a new inode.
    pub changed: usize,
    pub removed: usize,
}

impl Tree {
    /// Builds the tree of the sealed files under `prefix`. Files whose object size is not
    /// one a sealed file can have, or whose chunk size exceeds `max_chunk_log2`, are left
    /// out with a warning: they would only fail.
    pub fn build(listing: Listing, prefix: &str, max_chunk_log2: u8) -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node::Dir {
                children: BTreeMap::new(),
                parent: ROOT,
                name: String::new(),
            },
        );
        let mut t = Self {
            nodes,
            next_ino: ROOT + 1,
            retired: VecDeque::new(),
            retired_set: HashSet::new(),
            max_chunk_log2,
            manifests: HashMap::new(),
            changes: 0,
        };
        t.refresh(listing, prefix);
        t
    }

    /// Changes a successor must see so far (numbers given out or freed, identities).
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// The tree as it stands, for a successor (see [`TreeState`]).
    pub fn snapshot(&self) -> TreeState {
        let mut nodes: Vec<(u64, Node)> = self.nodes.iter().map(|(i, n)| (*i, n.clone())).collect();
        nodes.sort_unstable_by_key(|(i, _)| *i);
        TreeState {
            nodes,
            next_ino: self.next_ino,
            retired: self.retired.iter().copied().collect(),
        }
    }

    /// A predecessor's tree, checked: the root is a directory, every link names a node
    /// whose parent and name agree, no number reaches `next_ino`, retired nodes exist. The
    /// caller then applies a fresh listing with [`Tree::refresh`].
    pub fn restore(s: TreeState, max_chunk_log2: u8) -> Result<Self, String> {
        if s.nodes.len() > MAX_STATE_NODES || s.retired.len() > MAX_RETIRED {
            return Err("more nodes than a tree may hold".into());
        }
        let mut nodes = HashMap::with_capacity(s.nodes.len());
        for (ino, n) in s.nodes {
            if ino == 0 || ino >= s.next_ino || nodes.insert(ino, n).is_some() {
                return Err(format!("inode {ino} is out of range or given twice"));
            }
        }
        if !matches!(nodes.get(&ROOT), Some(Node::Dir { .. })) {
            return Err("no root directory".into());
        }
        for (ino, n) in &nodes {
            let (Node::Dir { parent, .. } | Node::File { parent, .. }) = n;
            let parent = *parent;
            if *ino != ROOT && !matches!(nodes.get(&parent), Some(Node::Dir { .. })) {
                return Err(format!("inode {ino}: parent {parent} is not a directory"));
            }
            if let Node::Dir { children, .. } = n {
                for (child_name, child) in children {
                    let linked = match nodes.get(child) {
                        Some(Node::Dir { parent, name, .. } | Node::File { parent, name, .. }) => {
                            *parent == *ino && name == child_name
                        }
                        None => false,
                    };
                    if !linked || *child == ROOT {
                        return Err(format!(
                            "inode {ino}: child {child_name:?} is not linked back"
                        ));
                    }
                }
            }
        }
        let mut retired = VecDeque::with_capacity(s.retired.len());
        let mut retired_set = HashSet::with_capacity(s.retired.len());
        for ino in s.retired {
            if ino == ROOT || !nodes.contains_key(&ino) || !retired_set.insert(ino) {
                return Err(format!("retired inode {ino} is not a node"));
            }
            retired.push_back(ino);
        }
        Ok(Self {
            nodes,
            next_ino: s.next_ino,
            retired,
            retired_set,
            max_chunk_log2,
            manifests: HashMap::new(),
            changes: 0,
        })
    }

    fn alloc(&mut self, node: Node) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        self.changes += 1;
        self.nodes.insert(ino, node);
        ino
    }

    /// Applies a newer listing: new files are added, a replaced object gets a new inode
    /// (the old one is retired), files gone from the listing are unlinked and retired, and
    /// directories left empty go with them.
    pub fn refresh(&mut self, listing: Listing, prefix: &str) -> Changes {
        listing.log_rejected();
        let mut c = Changes::default();
        let mut seen = HashSet::new();
        let mut hidden = 0usize;
        self.manifests.clear();
        for e in listing.sealed {
            if let Some(root) = crate::manifest::manifest_root(&e.logical) {
                self.manifests.insert(root.to_string(), e);
                continue;
            }
            let Some(rel) = crate::format::naming::relative_to(&e.logical, prefix) else {
                continue;
            };
            let rel = rel.to_string();
            let why = if e.chunk_log2 > self.max_chunk_log2 {
                Some(format!(
                    "chunk size 2^{} is above --max-chunk-size 2^{}",
                    e.chunk_log2, self.max_chunk_log2
                ))
            } else if e.plaintext_size().is_none() {
                Some(format!(
                    "object size {} impossible for a sealed file",
                    e.data.size
                ))
            } else {
                None
            };
            if let Some(why) = why {
                if hidden < MAX_LOGGED {
                    tracing::warn!(file = %escaped(&e.data.key), reason = %why, "hidden");
                }
                hidden += 1;
                continue;
            }
            let size = e.plaintext_size().expect("checked just above");
            // Keys passed naming::check_key, so every segment is a clean, non-empty name.
            let mut parts: Vec<&str> = rel.split('/').collect();
            let Some(name) = parts.pop() else { continue };
            let mut dir = ROOT;
            for p in parts {
                dir = self.child_dir(dir, p);
            }
            match self.lookup(dir, name) {
                Some(ino) => {
                    // A name that is both a file and a directory: the directory wins.
                    let Some(Node::File { entry, .. }) = self.nodes.get(&ino) else {
                        continue;
                    };
                    // Without ETags a replacement of the same size is invisible here;
                    // open's identity check catches it and moves the path to a new inode.
                    if entry.data.etag != e.data.etag
                        || entry.data.size != e.data.size
                        || entry.key_object.key != e.key_object.key
                    {
                        let new = self.replace(ino, e.clone(), size);
                        seen.insert(new);
                        c.changed += 1;
                    } else {
                        seen.insert(ino);
                    }
                }
                None => {
                    let ino = self.alloc(Node::File {
                        entry: e.clone(),
                        size,
                        parent: dir,
                        name: name.to_string(),
                        identity: None,
                    });
                    self.children_mut(dir).insert(name.to_string(), ino);
                    seen.insert(ino);
                    c.added += 1;
                }
            }
        }
        if hidden > MAX_LOGGED {
            tracing::warn!(
                count = hidden,
                "more files hidden; only the first {MAX_LOGGED} were logged"
            );
        }
        let gone: Vec<u64> = self
            .nodes
            .iter()
            .filter(|(ino, n)| {
                matches!(n, Node::File { .. })
                    && !seen.contains(*ino)
                    && !self.retired_set.contains(*ino)
            })
            .map(|(ino, _)| *ino)
            .collect();
        c.removed = gone.len();
        for ino in gone {
            self.unlink(ino);
        }
        c
    }

    /// Gives the path of file `ino` a new inode holding `entry`, and retires `ino`.
    /// Returns the new inode.
    pub fn replace(&mut self, ino: u64, entry: SealedEntry, size: u64) -> u64 {
        let Some(Node::File { parent, name, .. }) = self.nodes.get(&ino) else {
            return ino;
        };
        let (parent, name) = (*parent, name.clone());
        let new = self.alloc(Node::File {
            entry,
            size,
            parent,
            name: name.clone(),
            identity: None,
        });
        if self.lookup(parent, &name) == Some(ino) {
            self.children_mut(parent).insert(name, new);
        }
        self.retire(ino);
        new
    }

    /// Unlinks `ino` from its directory, retires it, and removes directories left empty.
    fn unlink(&mut self, ino: u64) {
        let (parent, name) = match self.nodes.get(&ino) {
            Some(Node::File { parent, name, .. }) | Some(Node::Dir { parent, name, .. }) => {
                (*parent, name.clone())
            }
            None => return,
        };
        // By name (O(log n)): removing many files is not quadratic under the tree lock.
        if let Some(Node::Dir { children, .. }) = self.nodes.get_mut(&parent) {
            if children.get(&name) == Some(&ino) {
                children.remove(&name);
            }
        }
        self.retire(ino);
        if parent != ROOT
            && matches!(self.nodes.get(&parent), Some(Node::Dir { children, .. }) if children.is_empty())
        {
            self.unlink(parent);
        }
    }

    fn retire(&mut self, ino: u64) {
        if ino == ROOT || !self.retired_set.insert(ino) {
            return;
        }
        self.changes += 1;
        self.retired.push_back(ino);
        while self.retired.len() > MAX_RETIRED {
            if let Some(old) = self.retired.pop_front() {
                self.retired_set.remove(&old);
                self.nodes.remove(&old);
            }
        }
    }

    /// The listed manifest of the model at `root`.
    pub fn manifest(&self, root: &str) -> Option<&SealedEntry> {
        self.manifests.get(root)
    }

    /// The listed entry of the file at `rel` (a path relative to the mount's prefix).
    pub fn file_entry(&self, rel: &str) -> Option<SealedEntry> {
        let mut at = ROOT;
        for name in rel.split('/') {
            at = self.lookup(at, name)?;
        }
        match self.nodes.get(&at) {
            Some(Node::File { entry, .. }) => Some(entry.clone()),
            _ => None,
        }
    }

    /// The roots of the models whose manifests are listed, sorted.
    pub fn model_roots(&self) -> Vec<String> {
        let mut roots: Vec<String> = self.manifests.keys().cloned().collect();
        roots.sort();
        roots
    }

    /// The version file `ino` stands for: the identity (header MAC) the first open
    /// authenticated, recorded then. `true` if `mac` is that version.
    pub fn same_version(&mut self, ino: u64, mac: &[u8; 32]) -> bool {
        match self.nodes.get_mut(&ino) {
            Some(Node::File { identity, .. }) => match identity {
                Some(known) => known == mac,
                None => {
                    *identity = Some(*mac);
                    self.changes += 1;
                    true
                }
            },
            _ => false,
        }
    }

    /// Every inode (listed or retired) of the data object `key`.
    pub fn inodes_of(&self, key: &str) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .nodes
            .iter()
            .filter(|(_, n)| matches!(n, Node::File { entry, .. } if entry.data.key == key))
            .map(|(ino, _)| *ino)
            .collect();
        v.sort_unstable();
        v
    }

    /// True if `ino` names a version that is no longer listed (replaced or removed).
    pub fn is_retired(&self, ino: u64) -> bool {
        self.retired_set.contains(&ino)
    }

    /// The kernel dropped its last reference to `ino`: a retired node is freed.
    pub fn forget(&mut self, ino: u64) {
        if self.retired_set.remove(&ino) {
            self.retired.retain(|i| *i != ino);
            self.nodes.remove(&ino);
            self.changes += 1;
        }
    }

    fn child_dir(&mut self, parent: u64, name: &str) -> u64 {
        if let Some(ino) = self.lookup(parent, name) {
            if matches!(self.get(ino), Some(Node::Dir { .. })) {
                return ino;
            }
            // A file where a directory is needed now: the directory wins.
            self.retire(ino);
        }
        let ino = self.alloc(Node::Dir {
            children: BTreeMap::new(),
            parent,
            name: name.to_string(),
        });
        self.children_mut(parent).insert(name.to_string(), ino);
        ino
    }

    fn children_mut(&mut self, dir: u64) -> &mut BTreeMap<String, u64> {
        match self.nodes.get_mut(&dir) {
            Some(Node::Dir { children, .. }) => children,
            _ => unreachable!("BUG: inode {dir} is not a directory"),
        }
    }

    pub fn get(&self, ino: u64) -> Option<&Node> {
        self.nodes.get(&ino)
    }

    pub fn lookup(&self, parent: u64, name: &str) -> Option<u64> {
        match self.get(parent)? {
            Node::Dir { children, .. } => children.get(name).copied(),
            Node::File { .. } => None,
        }
    }

    /// The file with the lowest inode inside the model at `root` (a file of that model, by
    /// the rule of `manifest::model_of`), or of the whole tree: the start check's sample.
    pub fn first_file_in(&self, root: Option<&str>) -> Option<u64> {
        let inside = |logical: &str| match root {
            None | Some("") => true,
            Some(r) => logical
                .strip_prefix(r)
                .is_some_and(|rest| rest.starts_with('/')),
        };
        self.nodes
            .iter()
            .filter(|(_, n)| matches!(n, Node::File { entry, .. } if inside(&entry.logical)))
            .map(|(i, _)| *i)
            .min()
    }

    /// Nodes held, retired ones included.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::object::pair;
    use crate::store::ObjectInfo;

    fn o(k: &str, s: u64, e: &str) -> ObjectInfo {
        ObjectInfo {
            key: k.into(),
            size: s,
            etag: e.into(),
            modified: None,
        }
    }

    #[test]
    fn tree_from_listing() {
        let l = pair(vec![
            o("p/a", 48, "e"),
            o("p/a.sealfs-c14", 1, "e"),
            o("p/d/e/b", 32 + 10 + 16, "e"),
            o("p/d/e/b.sealfs-c14", 1, "e"),
            o("p/junk", 5, "e"),
            o("p/bad", 40, "e"),
            o("p/bad.sealfs-c14", 1, "e"),
            o("p/big", 48, "e"),
            o("p/big.sealfs-c26", 1, "e"),
        ]);
        let t = Tree::build(l, "p", 20);
        let a = t.lookup(ROOT, "a").unwrap();
        assert!(matches!(t.get(a), Some(Node::File { size: 0, .. })));
        let d = t.lookup(ROOT, "d").unwrap();
        let e = t.lookup(d, "e").unwrap();
        let b = t.lookup(e, "b").unwrap();
        assert!(matches!(t.get(b), Some(Node::File { size: 10, .. })));
        assert_eq!(t.lookup(ROOT, "junk"), None, "unsealed objects are hidden");
        assert_eq!(t.lookup(ROOT, "bad"), None, "impossible sizes are hidden");
        assert_eq!(
            t.lookup(ROOT, "big"),
            None,
            "chunks above the maximum are hidden"
        );
    }

    #[test]
    fn unclean_names_never_become_entries() {
        let l = pair(vec![
            o("a//b", 48, "e"),
            o("a//b.sealfs-c14", 1, "e"),
            o("./c", 48, "e"),
            o("./c.sealfs-c14", 1, "e"),
            o("d/../e", 48, "e"),
            o("d/../e.sealfs-c14", 1, "e"),
            o("x\ny", 48, "e"),
            o("x\ny.sealfs-c14", 1, "e"),
        ]);
        let t = Tree::build(l, "", 20);
        assert_eq!(t.len(), 1, "only the root: nothing was linked");
        for n in ["a", "b", ".", "..", "c", "d", "e", "x\ny"] {
            assert_eq!(t.lookup(ROOT, n), None, "{n:?}");
        }
    }

    #[test]
    fn a_replaced_object_gets_a_new_inode_and_removed_files_are_freed() {
        let mut t = Tree::build(
            pair(vec![
                o("a", 48, "1"),
                o("a.sealfs-c14", 1, "k"),
                o("d/b", 48, "1"),
                o("d/b.sealfs-c14", 1, "k"),
            ]),
            "",
            20,
        );
        let a = t.lookup(ROOT, "a").unwrap();
        let d = t.lookup(ROOT, "d").unwrap();
        let b = t.lookup(d, "b").unwrap();
        // Same size, new ETag: a retrained model with the same shapes.
        let next = pair(vec![
            o("a", 48, "2"),
            o("a.sealfs-c14", 1, "k"),
            o("c", 48, "1"),
            o("c.sealfs-c14", 1, "k"),
        ]);
        assert_eq!(
            t.refresh(next, ""),
            Changes {
                added: 1,
                changed: 1,
                removed: 1
            }
        );
        let a2 = t.lookup(ROOT, "a").unwrap();
        assert_ne!(a2, a, "a new version is a new inode");
        assert!(t.is_retired(a) && !t.is_retired(a2));
        assert!(
            t.get(a).is_some(),
            "kept for handles open on it until forgotten"
        );
        assert_eq!(t.lookup(ROOT, "d"), None, "emptied directory removed");
        assert!(t.is_retired(b) && t.is_retired(d));
        t.forget(a);
        t.forget(b);
        t.forget(d);
        assert!(t.get(a).is_none() && t.get(b).is_none() && t.get(d).is_none());
        // root, a (new), c
        assert_eq!(t.len(), 3);
        // An unchanged listing changes nothing.
        let same = pair(vec![
            o("a", 48, "2"),
            o("a.sealfs-c14", 1, "k"),
            o("c", 48, "1"),
            o("c.sealfs-c14", 1, "k"),
        ]);
        assert_eq!(t.refresh(same, ""), Changes::default());
        assert_eq!(t.lookup(ROOT, "a"), Some(a2));
    }

    #[test]
    fn churn_does_not_grow_the_tree_without_bound() {
        let mut t = Tree::build(Listing::default(), "", 20);
        for round in 0..(MAX_RETIRED as u64 + 500) {
            let name = format!("f{round}");
            t.refresh(
                pair(vec![
                    o(&name, 48, "e"),
                    o(&format!("{name}.sealfs-c14"), 1, "k"),
                ]),
                "",
            );
        }
        assert!(
            t.len() <= MAX_RETIRED + 2,
            "{} nodes after churn: retired nodes must be bounded",
            t.len()
        );
    }
}
