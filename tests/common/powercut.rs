//! A file system that forgets, at a power cut, everything not fsynced: the
//! tests' own, in memory, mounted through FUSE (the `fuser` crate, no
//! libfuse; needs root and /dev/fuse). Each file keeps the content of its
//! last fsync apart from its live content; each folder keeps the names of
//! its last fsync apart from its live names (creating, renaming or
//! removing a file is durable only once its folder is fsynced, as POSIX
//! promises and no more). [`PowerCutFs::cut`] unmounts (every cache of the
//! kernel goes with it), puts every file and folder back to what was
//! fsynced, and mounts again at the same place: a machine that lost power
//! and booted again.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, WriteFlags,
};

const TTL: Duration = Duration::ZERO;
const ROOT: u64 = 1;

#[derive(Clone)]
enum Content {
    File(Vec<u8>),
    Dir(BTreeMap<OsString, u64>),
}

struct Node {
    live: Content,
    /// What a power cut leaves: the content at the last fsync.
    durable: Content,
    /// A file's bytes written since its last fsync (start, end): an fsync
    /// copies only these, so that a growing sled log costs what was
    /// written, not its whole size, at every commit.
    dirty: Option<(usize, usize)>,
    perm: u16,
    mtime: SystemTime,
}

impl Node {
    fn new(content: Content, perm: u16) -> Node {
        let empty = match content {
            Content::File(_) => Content::File(Vec::new()),
            Content::Dir(_) => Content::Dir(BTreeMap::new()),
        };
        Node {
            live: content,
            durable: empty,
            dirty: None,
            perm,
            mtime: SystemTime::now(),
        }
    }
}

#[derive(Default)]
struct Tree {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    fsyncs: u64,
}

impl Tree {
    fn new() -> Tree {
        let mut tree = Tree {
            next_ino: ROOT + 1,
            ..Tree::default()
        };
        tree.nodes
            .insert(ROOT, Node::new(Content::Dir(BTreeMap::new()), 0o755));
        tree
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let node = self.nodes.get(&ino)?;
        let (kind, size) = match &node.live {
            Content::File(bytes) => (FileType::RegularFile, bytes.len() as u64),
            Content::Dir(_) => (FileType::Directory, 0),
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: node.mtime,
            mtime: node.mtime,
            ctime: node.mtime,
            crtime: node.mtime,
            kind,
            perm: node.perm,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    fn entries(&mut self, ino: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match self.nodes.get_mut(&ino).map(|n| &mut n.live) {
            Some(Content::Dir(entries)) => Ok(entries),
            Some(Content::File(_)) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn file(&mut self, ino: u64) -> Result<&Vec<u8>, Errno> {
        match self.nodes.get(&ino).map(|n| &n.live) {
            Some(Content::File(bytes)) => Ok(bytes),
            Some(Content::Dir(_)) => Err(Errno::EISDIR),
            None => Err(Errno::ENOENT),
        }
    }

    /// A file's live bytes to change, with the range about to change
    /// marked dirty.
    fn file_mut(&mut self, ino: u64, start: usize, end: usize) -> Result<&mut Vec<u8>, Errno> {
        let node = self.nodes.get_mut(&ino).ok_or(Errno::ENOENT)?;
        node.mtime = SystemTime::now();
        node.dirty = Some(match node.dirty {
            Some((s, e)) => (s.min(start), e.max(end)),
            None => (start, end),
        });
        match &mut node.live {
            Content::File(bytes) => Ok(bytes),
            Content::Dir(_) => Err(Errno::EISDIR),
        }
    }

    fn write_at(&mut self, ino: u64, offset: usize, data: &[u8]) -> Result<(), Errno> {
        let end = offset + data.len();
        let bytes = self.file_mut(ino, offset, end)?;
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[offset..end].copy_from_slice(data);
        Ok(())
    }

    fn truncate(&mut self, ino: u64, size: usize) -> Result<(), Errno> {
        let old = self.file(ino)?.len();
        self.file_mut(ino, size.min(old), size.max(old))?
            .resize(size, 0);
        Ok(())
    }

    fn add(
        &mut self,
        parent: u64,
        name: &OsStr,
        content: Content,
        perm: u16,
    ) -> Result<u64, Errno> {
        let ino = self.next_ino;
        let entries = self.entries(parent)?;
        if entries.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        entries.insert(name.to_owned(), ino);
        self.next_ino += 1;
        self.nodes.insert(ino, Node::new(content, perm));
        Ok(ino)
    }

    fn sync(&mut self, ino: u64) -> Result<(), Errno> {
        let node = self.nodes.get_mut(&ino).ok_or(Errno::ENOENT)?;
        match (&node.live, &mut node.durable) {
            (Content::File(live), Content::File(durable)) => {
                durable.resize(live.len(), 0);
                if let Some((start, end)) = node.dirty.take() {
                    let end = end.min(live.len());
                    if start < end {
                        durable[start..end].copy_from_slice(&live[start..end]);
                    }
                }
            }
            (live, durable) => *durable = live.clone(),
        }
        self.fsyncs += 1;
        Ok(())
    }

    /// Back to what was fsynced; nodes no durable folder names are gone.
    fn cut(&mut self) {
        for node in self.nodes.values_mut() {
            node.live = node.durable.clone();
            node.dirty = None;
        }
        let mut reachable = vec![ROOT];
        let mut seen = std::collections::HashSet::new();
        while let Some(ino) = reachable.pop() {
            if !seen.insert(ino) {
                continue;
            }
            if let Some(Content::Dir(entries)) = self.nodes.get(&ino).map(|n| &n.live) {
                reachable.extend(entries.values().copied());
            }
        }
        self.nodes.retain(|ino, _| seen.contains(ino));
    }
}

#[derive(Clone)]
struct Fs(Arc<Mutex<Tree>>);

impl Fs {
    fn reply_entry(&self, result: Result<u64, Errno>, reply: ReplyEntry) {
        let tree = self.0.lock().unwrap();
        match result.and_then(|ino| tree.attr(ino).ok_or(Errno::ENOENT)) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }
}

impl Filesystem for Fs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = self
            .0
            .lock()
            .unwrap()
            .entries(parent.0)
            .and_then(|e| e.get(name).copied().ok_or(Errno::ENOENT));
        self.reply_entry(found, reply);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.0.lock().unwrap().attr(ino.0) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut tree = self.0.lock().unwrap();
        if let Some(size) = size {
            if let Err(e) = tree.truncate(ino.0, size as usize) {
                return reply.error(e);
            }
        }
        if let (Some(mode), Some(node)) = (mode, tree.nodes.get_mut(&ino.0)) {
            node.perm = (mode & 0o7777) as u16;
        }
        match tree.attr(ino.0) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let added = self.0.lock().unwrap().add(
            parent.0,
            name,
            Content::Dir(BTreeMap::new()),
            (mode & 0o7777) as u16,
        );
        self.reply_entry(added, reply);
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mut tree = self.0.lock().unwrap();
        let added = tree.add(
            parent.0,
            name,
            Content::File(Vec::new()),
            (mode & 0o7777) as u16,
        );
        match added.and_then(|ino| tree.attr(ino).ok_or(Errno::ENOENT)) {
            Ok(attr) => reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(0),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self
            .0
            .lock()
            .unwrap()
            .entries(parent.0)
            .map(|e| e.remove(name))
        {
            Ok(Some(_)) => reply.ok(),
            Ok(None) => reply.error(Errno::ENOENT),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut tree = self.0.lock().unwrap();
        let Some(ino) = tree
            .entries(parent.0)
            .ok()
            .and_then(|e| e.get(name).copied())
        else {
            return reply.error(Errno::ENOENT);
        };
        match tree.entries(ino) {
            Ok(children) if !children.is_empty() => return reply.error(Errno::ENOTEMPTY),
            Ok(_) => {}
            Err(e) => return reply.error(e),
        }
        tree.entries(parent.0).unwrap().remove(name);
        reply.ok()
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut tree = self.0.lock().unwrap();
        let Some(ino) = tree.entries(parent.0).ok().and_then(|e| e.remove(name)) else {
            return reply.error(Errno::ENOENT);
        };
        match tree.entries(newparent.0) {
            Ok(entries) => {
                entries.insert(newname.to_owned(), ino);
                reply.ok()
            }
            Err(e) => {
                tree.entries(parent.0).unwrap().insert(name.to_owned(), ino);
                reply.error(e)
            }
        }
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut tree = self.0.lock().unwrap();
        match tree.file(ino.0) {
            Ok(bytes) => {
                let start = (offset as usize).min(bytes.len());
                let end = (start + size as usize).min(bytes.len());
                reply.data(&bytes[start..end]);
            }
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self
            .0
            .lock()
            .unwrap()
            .write_at(ino.0, offset as usize, data)
        {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.0.lock().unwrap().sync(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut tree = self.0.lock().unwrap();
        let listed: Vec<(u64, OsString)> = match tree.entries(ino.0) {
            Ok(entries) => entries.iter().map(|(n, i)| (*i, n.clone())).collect(),
            Err(e) => return reply.error(e),
        };
        let mut all = vec![
            (ino.0, FileType::Directory, OsString::from(".")),
            (ROOT, FileType::Directory, OsString::from("..")),
        ];
        for (child, name) in listed {
            let kind = tree.attr(child).map_or(FileType::RegularFile, |a| a.kind);
            all.push((child, kind, name));
        }
        for (i, (child, kind, name)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        // A folder's durable content is its names: the same as a file's.
        self.fsync(req, ino, fh, datasync, reply)
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(1 << 24, 1 << 23, 1 << 23, 1 << 20, 1 << 19, 4096, 255, 4096);
    }
}

/// The file system, mounted at `mountpoint` until dropped.
pub struct PowerCutFs {
    tree: Arc<Mutex<Tree>>,
    mountpoint: PathBuf,
    session: Option<fuser::BackgroundSession>,
}

impl PowerCutFs {
    /// Why this machine cannot run the power-cut tests, if it cannot.
    pub fn unavailable() -> Option<String> {
        if unsafe { libc::geteuid() } != 0 {
            return Some("not root, so no FUSE file system can be mounted".into());
        }
        if !Path::new("/dev/fuse").exists() {
            return Some("/dev/fuse is missing (no FUSE in this kernel or container)".into());
        }
        None
    }

    pub fn mount(mountpoint: &Path) -> std::io::Result<PowerCutFs> {
        std::fs::create_dir_all(mountpoint)?;
        let mut fs = PowerCutFs {
            tree: Arc::new(Mutex::new(Tree::new())),
            mountpoint: mountpoint.to_path_buf(),
            session: None,
        };
        fs.mount_again()?;
        Ok(fs)
    }

    fn mount_again(&mut self) -> std::io::Result<()> {
        let mut config = fuser::Config::default();
        config.mount_options = vec![fuser::MountOption::FSName("powercut".into())];
        let session = fuser::spawn_mount(Fs(self.tree.clone()), &self.mountpoint, &config)?;
        self.session = Some(session);
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// fsyncs (files and folders) received so far.
    pub fn fsyncs(&self) -> u64 {
        self.tree.lock().unwrap().fsyncs
    }

    /// A power cut and a boot: whatever was not fsynced is gone. Nothing
    /// may have a file open on it (kill its users first).
    pub fn cut(&mut self) -> std::io::Result<()> {
        if let Some(session) = self.session.take() {
            session.umount_and_join()?;
        }
        self.tree.lock().unwrap().cut();
        self.mount_again()
    }
}

impl Drop for PowerCutFs {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            let _ = session.umount_and_join();
        }
    }
}
