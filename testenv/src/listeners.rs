//! Who listens on a port: read from `/proc`, so a start-up check can tell the
//! component it started from whatever else took the port first.
//!
//! `free_port()` finds a port free and the component binds it later; in
//! between anything on the machine can take it. A component that loses that
//! race exits (or logs) with "address already in use", and a bare connect to
//! the port would answer for the other program. So readiness is judged by
//! the component's own listening socket, and a lost race is retried.

use std::path::Path;

/// What a component logs when its port was taken (Go's `bind: address
/// already in use`, the same words in every component).
pub fn lost_port_race(log: &str) -> bool {
    log.contains("address already in use")
}

/// The socket inodes listening on `port` in a `/proc/net/tcp{,6}` table.
pub fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let local = fields.get(1)?;
            let state = fields.get(3)?;
            let inode = fields.get(9)?;
            let (_, hex_port) = local.rsplit_once(':')?;
            let listens = *state == "0A" && u16::from_str_radix(hex_port, 16).ok()? == port;
            listens.then(|| inode.parse().ok()).flatten()
        })
        .collect()
}

/// Whether process `pid` itself holds a socket listening on TCP `port`, in
/// its own network namespace.
pub fn process_listens(pid: i32, port: u16) -> bool {
    let proc_dir = Path::new("/proc").join(pid.to_string());
    let mut inodes = Vec::new();
    for table in ["net/tcp", "net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(proc_dir.join(table)) {
            inodes.extend(listening_inodes(&text, port));
        }
    }
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(proc_dir.join("fd")) else {
        return false;
    };
    fds.filter_map(Result::ok).any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|target| {
            inodes
                .iter()
                .any(|inode| target.as_os_str() == format!("socket:[{inode}]").as_str())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 20 4 30 10 -1
   2: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn only_listening_sockets_on_the_port_count() {
        assert_eq!(listening_inodes(TABLE, 8080), vec![4242]);
        assert_eq!(listening_inodes(TABLE, 80), vec![4444]);
        assert!(listening_inodes(TABLE, 50000).is_empty());
        assert!(listening_inodes("", 80).is_empty());
    }

    #[test]
    fn a_listener_of_this_process_is_found_and_another_port_is_not() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let me = std::process::id() as i32;
        assert!(process_listens(me, port));
        drop(listener);
        assert!(!process_listens(me, port));
    }

    #[test]
    fn the_bind_error_of_go_programs_is_recognised() {
        assert!(lost_port_race(
            "E1128 run.go:72] \"command failed\" err=\"failed to listen on 127.0.0.1:36677: listen tcp 127.0.0.1:36677: bind: address already in use\""
        ));
        assert!(!lost_port_race("I1128 serving on 127.0.0.1:36677"));
    }
}
