const http = require("http");
const port = Number(process.env.PORT || 3000);
http.createServer((req, res) => res.end(req.url === "/health" ? "ok" : "backend")).listen(port);
