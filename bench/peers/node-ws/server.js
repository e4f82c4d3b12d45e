// The Node.js `ws` peer: text echo at "/" ("Echo: <text>", like the seed),
// and at "/fan" every message is sent to every other connection.
const { WebSocketServer } = require("ws");

const port = Number(process.argv[2] || 8080);
const wss = new WebSocketServer({ host: "127.0.0.1", port, perMessageDeflate: false });
const fan = new Set();

wss.on("connection", (ws, req) => {
  if (req.url === "/fan") {
    fan.add(ws);
    ws.on("close", () => fan.delete(ws));
    ws.on("message", (data) => {
      for (const other of fan) {
        if (other !== ws) other.send(data.toString());
      }
    });
  } else {
    ws.on("message", (data) => ws.send(`Echo: ${data}`));
  }
});
wss.on("listening", () => console.log(`listening on ${port}`));
