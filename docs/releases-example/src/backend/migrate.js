console.log("nothing to migrate in the example");
