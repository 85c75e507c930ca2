//! One node's view of the cluster: its `CLUSTER NODES` reply, parsed.

use crate::resp;

/// One line of `CLUSTER NODES`:
/// `<id> <ip:port@cport[,hostname]> <flags> <master> <ping> <pong> <epoch> <link> <slot>...`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLine {
    pub id: String,
    pub port: u16,
    /// `myself`, `master`, `slave`, `fail?`, `fail`, `handshake`, ...
    pub flags: Vec<String>,
    /// A replica's master's id.
    pub master_id: Option<String>,
    /// Inclusive ranges of the slots this master serves (not those it imports or
    /// migrates, which are listed in brackets).
    pub slots: Vec<(u16, u16)>,
}

impl NodeLine {
    fn parse(line: &str) -> Option<NodeLine> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (address, _) = fields.get(1)?.split_once('@')?;
        let (_, port) = address.rsplit_once(':')?;
        let slots = fields.get(8..).unwrap_or_default().iter().filter_map(|s| {
            if s.starts_with('[') {
                return None;
            }
            let (first, last) = s.split_once('-').unwrap_or((s, s));
            Some((first.parse().ok()?, last.parse().ok()?))
        });
        Some(NodeLine {
            id: fields.first()?.to_string(),
            port: port.parse().ok()?,
            flags: fields.get(2)?.split(',').map(String::from).collect(),
            master_id: Some(fields.get(3)?.to_string()).filter(|m| m != "-"),
            slots: slots.collect(),
        })
    }

    pub fn is_master(&self) -> bool {
        self.flags.iter().any(|f| f == "master")
    }

    /// Whether this view of a node says what `other` (another view of it) says: the
    /// same role, master and slots.
    pub fn agrees(&self, other: &NodeLine) -> bool {
        self.id == other.id
            && self.is_master() == other.is_master()
            && self.master_id == other.master_id
            && self.slots == other.slots
    }

    fn serves(&self, slot: u16) -> bool {
        self.is_master() && self.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
    }
}

/// `CLUSTER NODES` of one node.
#[derive(Debug, Clone)]
pub struct View {
    pub lines: Vec<NodeLine>,
}

impl View {
    /// Asks the node on `port`; `None` when it does not answer (yet, or any more).
    pub async fn of(port: u16) -> Option<View> {
        let reply = resp::command(port, &["CLUSTER", "NODES"]).await.ok()?;
        View::parse(&reply.text()?)
    }

    fn parse(text: &str) -> Option<View> {
        let lines = text.lines().filter(|l| !l.trim().is_empty());
        let lines = lines.map(NodeLine::parse).collect::<Option<Vec<_>>>()?;
        Some(View { lines })
    }

    /// The node that answered.
    pub fn myself(&self) -> Option<&NodeLine> {
        self.lines
            .iter()
            .find(|l| l.flags.iter().any(|f| f == "myself"))
    }

    pub fn by_port(&self, port: u16) -> Option<&NodeLine> {
        self.lines.iter().find(|l| l.port == port)
    }

    pub fn by_id(&self, id: &str) -> Option<&NodeLine> {
        self.lines.iter().find(|l| l.id == id)
    }

    /// Whether this view says of `node` what `node` says of itself.
    pub fn agrees(&self, node: &NodeLine) -> bool {
        self.by_id(&node.id).is_some_and(|line| line.agrees(node))
    }

    /// The master this node believes serves `slot`.
    pub fn owner_of(&self, slot: u16) -> Option<&NodeLine> {
        self.lines.iter().find(|l| l.serves(slot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODES: &str = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004,host replica e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460 [5461-<-67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1]
6ec23923021cf3ffec47632106199cb7f496ce01 127.0.0.1:30005@31005 slave 67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 0 1426238316232 5 connected
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:30003@31003 master,fail - 0 1426238318243 3 disconnected 10923 10924-16383
";

    #[test]
    fn a_view_says_who_serves_a_slot_and_who_replicates_whom() {
        let view = View::parse(NODES).unwrap();
        assert_eq!(view.myself().unwrap().port, 30001);
        assert_eq!(view.owner_of(0).unwrap().port, 30001);
        assert_eq!(
            view.owner_of(5461).unwrap().port,
            30002,
            "importing is not serving"
        );
        assert_eq!(view.owner_of(10923).unwrap().port, 30003);
        assert_eq!(view.owner_of(16383).unwrap().port, 30003);
        let replica = view.by_port(30005).unwrap();
        assert!(!replica.is_master());
        let master = view.by_id(replica.master_id.as_deref().unwrap()).unwrap();
        assert_eq!(master.port, 30002);
        assert_eq!(
            view.by_port(30004).unwrap().port,
            30004,
            "hostnames are ignored"
        );
    }

    #[test]
    fn a_view_that_missed_a_replication_disagrees_with_the_replica() {
        let view = View::parse(NODES).unwrap();
        let replica = view.by_port(30005).unwrap().clone();
        assert!(view.agrees(&replica));
        let stale = NODES.replace(
            "30005@31005 slave 67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1",
            "30005@31005 master -",
        );
        assert!(!View::parse(&stale).unwrap().agrees(&replica));
        let moved = NODES.replace("connected 5461-10922", "connected 5462-10922");
        let master = view.by_port(30002).unwrap();
        assert!(!View::parse(&moved).unwrap().agrees(master));
    }
}
