require("fs").mkdirSync("dist", {recursive: true});
require("fs").writeFileSync("dist/index.html", "<h1>admin</h1>\n");
